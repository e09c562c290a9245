"""The domain priors of a training run, from its ``train:`` keys (official names).

Description embeddings come from ``text_embeddings`` (a file written by ``python -m
datprl_arch.tools.encode_descriptions``) or, as in the official option file, from ``text_description_paths`` (one
descriptions JSON per training source, in source order) encoded at start-up with the local CLIP RN50 weights of
``clip_weights`` (or ``text_encoder: hash``, the deterministic stand-in). ``use_clip_constraint: true`` without
either is an error (:func:`clip_constraint_problem`; the option validation reports it before anything is built):
the method would silently train without its domain prior. Every file of ``text_description_paths`` must exist,
whichever encoder is used.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Optional, Sequence

from ..options import OptionFileError
from .descriptions import DescriptionError
from .embeddings import DescriptionEmbeddings
from .encoders import clip_encoder, encode_files, hash_encoder

#: Encoders of ``text_description_paths`` at start-up (None: the one ``clip_weights`` implies, if any).
TEXT_ENCODERS = (None, 'clip', 'hash')
#: CLIP model named in the official option files (``clip_model``), recorded in the embeddings' encoder name.
DEFAULT_CLIP_MODEL = 'RN50'


def clip_constraint_problem(train_opt: dict) -> Optional[str]:
    """Why ``use_clip_constraint: true`` cannot be applied with these ``train:`` options (no embeddings file, no
    description files, or description files without an encoder), or None. Files are checked where they are read."""
    if not train_opt.get('use_clip_constraint') or train_opt.get('text_embeddings'):
        return None
    if not train_opt.get('text_description_paths'):
        what = 'neither text_embeddings nor text_description_paths is set'
    elif not train_opt.get('clip_weights') and train_opt.get('text_encoder') != 'hash':
        what = 'text_description_paths is set but no encoder for them (clip_weights or text_encoder: hash)'
    else:
        return None
    return (f'use_clip_constraint: true, but the domain-prior constraint cannot be applied: {what}. Set '
            'text_embeddings to a file written by python -m datprl_arch.tools.encode_descriptions, or '
            'clip_weights to local CLIP RN50 weights for text_description_paths; or set use_clip_constraint: false '
            'to train without the constraint')


def training_embeddings(train_opt: dict, source_names: Sequence[str]) -> Optional[DescriptionEmbeddings]:
    """The description embeddings a run with these ``train:`` options aligns to; ``source_names`` are the training
    sources in order (``text_description_paths`` gives one file per source). None when the options name none."""
    from basicsr.utils import get_root_logger

    if train_opt.get('text_embeddings'):
        return DescriptionEmbeddings.load(train_opt['text_embeddings'])
    paths = train_opt.get('text_description_paths') or []
    if not paths:
        return None
    missing = [str(p) for p in paths if not osp.isfile(str(p))]
    if missing:
        raise OptionFileError(f'train.text_description_paths: {len(missing)} of {len(paths)} description file(s) '
                              f'do not exist: {missing} (relative paths start from {os.getcwd()})')
    if len(source_names) != len(paths):
        raise ValueError(f'train.text_description_paths lists {len(paths)} files for {len(source_names)} training '
                         'sources; give one descriptions JSON per source, in the order of datasets.train.datasets')
    text_encoder = train_opt.get('text_encoder') or ('clip' if train_opt.get('clip_weights') else None)
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"train.text_encoder must be one of {TEXT_ENCODERS}, got '{text_encoder}'")
    if text_encoder == 'hash':
        encoder, name = hash_encoder(), 'hash'
    elif train_opt.get('clip_weights'):
        try:
            encoder = clip_encoder(train_opt['clip_weights'], 'cpu')
        except DescriptionError as err:
            raise ValueError(f'train.clip_weights: {err}') from err
        name = f"open_clip:{train_opt.get('clip_model', DEFAULT_CLIP_MODEL)}:{train_opt['clip_weights']}"
    else:
        return None
    get_root_logger().info(f'Encoding {len(paths)} description files with {name}')
    return encode_files(list(zip(source_names, paths)), encoder, name)
