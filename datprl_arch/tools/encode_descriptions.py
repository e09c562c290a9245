"""Encode image descriptions (JSON: image name -> text) into the text embeddings the domain-alignment loss reads.

    python -m datprl_arch.tools.encode_descriptions [SOURCE=]descriptions.json [...] --out priors.pt \\
        (--clip-weights RN50.pt | --sentence-transformers MODEL_DIR | --encoder hash) [--overwrite]

The command line of :mod:`datprl_arch.priors.encoders`: ``--clip-weights`` is the paper's CLIP RN50 text encoder (a
local copy of the OpenAI RN50 checkpoint; needs the optional ``open_clip_torch`` package), ``--sentence-transformers``
a local sentence-transformers model directory, ``--encoder hash`` the deterministic built-in stand-in for tests and
demos. Nothing is downloaded.

SOURCE (the dataset source the descriptions belong to) defaults to the JSON's folder name when the file is called
``descriptions.json`` (the dataset layout ``<source>/descriptions.json``), else to the file name without extension.
Keys starting with ``__`` are metadata. The output format is described in ``datprl_arch.priors.embeddings``.
"""
from __future__ import annotations

import argparse
import logging
import os.path as osp
import sys
from typing import Optional, Sequence

from datprl_arch.priors.descriptions import DescriptionError
from datprl_arch.priors.encoders import (HASH_DIM, HASH_ENCODER, clip_encoder, encode_files, hash_encoder,
                                         sentence_transformers_encoder)


def default_source(path: str) -> str:
    """``<source>/descriptions.json`` -> source; ``llava_output_rain.json`` -> llava_output_rain."""
    base = osp.splitext(osp.basename(path))[0]
    return osp.basename(osp.dirname(osp.abspath(path))) if base == 'descriptions' else base


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
