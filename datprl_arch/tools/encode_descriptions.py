"""Encode image descriptions (JSON: image name -> text) into the text embeddings the domain-alignment loss reads.

    python -m datprl_arch.tools.encode_descriptions [SOURCE=]descriptions.json [...] --out priors.pt \\
        (--clip-weights RN50.pt | --sentence-transformers MODEL_DIR | --encoder hash) [--overwrite]

The paper embeds MLLM (LLaVA) descriptions with CLIP RN50's text encoder (``--clip-weights``: a local copy of the
OpenAI RN50 checkpoint; needs the optional ``open_clip_torch`` package). ``--sentence-transformers`` uses a local
sentence-transformers model directory instead. ``--encoder hash`` is a small deterministic built-in stand-in (signed
feature hashing of words, word pairs and character trigrams): it needs nothing, captures shared wording only, and is
meant for tests and demos, not for reproducing the paper. Nothing is downloaded.

SOURCE (the dataset source the descriptions belong to) defaults to the JSON's folder name when the file is called
``descriptions.json`` (the dataset layout ``<source>/descriptions.json``), else to the file name without extension.
Keys starting with ``__`` are metadata. The output format is described in ``datprl_arch.losses.description_embeddings``.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import os.path as osp
import re
import sys
from typing import Callable, Optional, Sequence

import torch
from torch.nn import functional as F

from datprl_arch.data.descriptions import META_PREFIX, DescriptionError, read_descriptions  # noqa: F401  (re-exported)
from datprl_arch.losses.description_embeddings import DescriptionEmbeddings

#: Default width of the hash encoder (CLIP RN50's text width, so it matches the 6T domain prompt without projection).
HASH_DIM = 1024
HASH_ENCODER = 'hash-ngram-v1'
#: Character n-gram length of the hash encoder.
CHAR_NGRAM = 3
#: Texts per forward of a neural encoder.
BATCH_SIZE = 64

Encoder = Callable[[list[str]], torch.Tensor]


def default_source(path: str) -> str:
    """``<source>/descriptions.json`` -> source; ``llava_output_rain.json`` -> llava_output_rain."""
    base = osp.splitext(osp.basename(path))[0]
    return osp.basename(osp.dirname(osp.abspath(path))) if base == 'descriptions' else base


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


def _source_and_path(arg: str) -> tuple[str, str]:
    source, sep, path = arg.partition('=')
    return (source, path) if sep and source and not osp.exists(arg) else (default_source(arg), arg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basicsr.utils import get_root_logger

    parser = argparse.ArgumentParser(prog='python -m datprl_arch.tools.encode_descriptions',
                                     description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('descriptions', nargs='+', metavar='[SOURCE=]JSON', help='descriptions file(s), one per source')
    parser.add_argument('--out', required=True, help='output embeddings file (.pt)')
    parser.add_argument('--encoder', choices=('clip', 'sentence-transformers', 'hash'),
                        help='text encoder (default: the one whose path option is given)')
    parser.add_argument('--clip-weights', metavar='PATH', help='local OpenAI CLIP RN50 checkpoint (needs open_clip)')
    parser.add_argument('--sentence-transformers', metavar='DIR', dest='st_dir',
                        help='local sentence-transformers model directory (needs sentence-transformers)')
    parser.add_argument('--dim', type=int, default=HASH_DIM, help=f'hash encoder width (default {HASH_DIM})')
    parser.add_argument('--device', default='cpu', help='device of neural encoders (default cpu)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    args = parser.parse_args(argv)
    given = [name for name, value in (('clip', args.clip_weights), ('sentence-transformers', args.st_dir)) if value]
    if len(given) > 1 or (given and args.encoder not in (None, given[0])):
        parser.error('choose one encoder: --clip-weights, --sentence-transformers or --encoder hash')
    encoder_kind = args.encoder or (given[0] if given else None)
    if encoder_kind is None:
        parser.error('no encoder: give --clip-weights PATH, --sentence-transformers DIR or --encoder hash')
    if encoder_kind == 'clip' and not args.clip_weights:
        parser.error('--encoder clip needs --clip-weights PATH')
    if encoder_kind == 'sentence-transformers' and not args.st_dir:
        parser.error('--encoder sentence-transformers needs --sentence-transformers DIR')
    if osp.exists(args.out) and not args.overwrite:
        parser.error(f'{args.out} exists; pass --overwrite to replace it')
    try:
        if encoder_kind == 'hash':
            encoder, name = hash_encoder(args.dim), HASH_ENCODER
        elif encoder_kind == 'clip':
            encoder = clip_encoder(args.clip_weights, args.device)
            name = f'open_clip:RN50:{osp.basename(args.clip_weights)}'
        else:
            encoder = sentence_transformers_encoder(args.st_dir, args.device)
            name = f'sentence-transformers:{osp.basename(osp.normpath(args.st_dir))}'
        table = encode_files([_source_and_path(a) for a in args.descriptions], encoder, name)
    except DescriptionError as err:
        parser.exit(2, f'error: {err}\n')
    table.save(args.out)
    logger = get_root_logger()
    logger.setLevel(logging.INFO)
    counts = {s: table.sources.count(s) for s in dict.fromkeys(table.sources)}
    logger.info(f'Wrote {len(table.names)} description embeddings ({table.encoder}, dim {table.dim}) of sources '
                f'{counts} to {args.out}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
