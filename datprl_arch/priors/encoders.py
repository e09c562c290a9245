"""Text encoders for image descriptions, and the encoding of descriptions files into description embeddings.

The paper embeds MLLM (LLaVA) descriptions with CLIP RN50's text encoder (:func:`clip_encoder`: a local copy of the
OpenAI RN50 checkpoint; needs the optional ``open_clip_torch`` package). :func:`sentence_transformers_encoder` uses a
local sentence-transformers model directory instead. :func:`hash_encoder` is a small deterministic built-in stand-in
(signed feature hashing of words, word pairs and character trigrams): it needs nothing, captures shared wording only,
and is meant for tests and demos, not for reproducing the paper. Nothing is downloaded.

An encoder maps a list of N texts to an ``[N, E]`` float tensor; :func:`encode_files` turns descriptions files into
unit-norm :class:`~datprl_arch.priors.embeddings.DescriptionEmbeddings`.
"""
from __future__ import annotations

import hashlib
import os
import os.path as osp
import re
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from .descriptions import DescriptionError, read_descriptions
from .embeddings import DescriptionEmbeddings

#: Default width of the hash encoder (CLIP RN50's text width, so it matches the 6T domain prompt without projection).
HASH_DIM = 1024
HASH_ENCODER = 'hash-ngram-v1'
#: Character n-gram length of the hash encoder.
CHAR_NGRAM = 3
#: Texts per forward of a neural encoder.
BATCH_SIZE = 64

Encoder = Callable[[list[str]], torch.Tensor]


def _hash(feature: str) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode('utf-8'), digest_size=8).digest(), 'little')


def hash_features(text: str) -> list[str]:
    """Words, adjacent word pairs and character trigrams of the lower-cased words (padded with '<', '>')."""
    words = re.findall(r'\w+', text.lower())
    pairs = [f'{a} {b}' for a, b in zip(words, words[1:])]
    grams = [padded[i:i + CHAR_NGRAM] for w in words for padded in [f'<{w}>']
             for i in range(len(padded) - CHAR_NGRAM + 1)]
    return [f'w:{w}' for w in words] + [f'p:{p}' for p in pairs] + [f'c:{g}' for g in grams]


def hash_encoder(dim: int = HASH_DIM) -> Encoder:
    """Signed feature hashing into ``dim`` buckets, L2-normalised: same wording -> similar vectors. A stand-in."""
    if dim < 1:
        raise DescriptionError(f'--dim must be positive, got {dim}')

    def encode(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), dim)
        for row, text in enumerate(texts):
            features = hash_features(text)
            if not features:
                raise DescriptionError(f'the hash encoder finds no words in the description {text!r}')
            for feature in features:
                h = _hash(feature)
                out[row, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out

    return encode


def clip_encoder(weights: str, device: str) -> Encoder:
    """CLIP RN50's text tower from a local OpenAI-format checkpoint, via the optional open_clip package."""
    if not osp.isfile(weights):
        raise DescriptionError(f'--clip-weights {weights} does not exist; give a local copy of the OpenAI CLIP RN50 '
                               f'checkpoint (RN50.pt); nothing is downloaded')
    try:
        import open_clip
    except ImportError as err:
        raise DescriptionError('--clip-weights needs the optional package open_clip (pip install open_clip_torch), '
                               'which is not installed; or use --sentence-transformers DIR or --encoder hash') from err
    try:
        model = open_clip.load_openai_model(weights, precision='fp32', device=device).eval()
    except Exception as err:  # open_clip raises RuntimeError/KeyError/... for files it cannot build a model from
        raise DescriptionError(f'--clip-weights {weights}: open_clip cannot load it as an OpenAI CLIP checkpoint '
                               f'({err})') from err

    def encode(texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(open_clip.tokenize(texts).to(device)).float().cpu()

    return encode


def sentence_transformers_encoder(model_dir: str, device: str) -> Encoder:
    """A local sentence-transformers model directory, via the optional sentence-transformers package (offline)."""
    if not osp.isdir(model_dir):
        raise DescriptionError(f'--sentence-transformers {model_dir} is not a directory; give a local '
                               f'sentence-transformers model folder; nothing is downloaded')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise DescriptionError('--sentence-transformers needs the optional package sentence-transformers, which is '
                               'not installed; or use --encoder hash') from err
    model = SentenceTransformer(model_dir, device=device)

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, batch_size=BATCH_SIZE, convert_to_tensor=True).float().cpu()

    return encode


def encode_files(files: Sequence[tuple[str, str]], encoder: Encoder, encoder_name: str) -> DescriptionEmbeddings:
    """``[(source, json path)]`` -> unit embeddings of every description; identical texts are encoded once."""
    names, sources, texts, seen = [], [], [], {}
    for source, path in files:
        for name, text in read_descriptions(path).items():
            if (source, name) in seen:
                raise DescriptionError(f"descriptions file {path}: key '{name}' of source '{source}' is also in "
                                       f'{seen[(source, name)]}')
            seen[(source, name)] = path
            names.append(name)
            sources.append(source)
            texts.append(text)
    unique = list(dict.fromkeys(texts))
    encoded = torch.cat([encoder(unique[i:i + BATCH_SIZE]) for i in range(0, len(unique), BATCH_SIZE)])
    row_of_text = {text: row for row, text in enumerate(unique)}
    embeddings = F.normalize(encoded[[row_of_text[t] for t in texts]], dim=-1)
    return DescriptionEmbeddings(names, sources, embeddings, encoder_name)
