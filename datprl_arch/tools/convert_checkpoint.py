"""Convert a checkpoint that cannot be read with ``weights_only=True`` into a plain BasicSR weights file.

Official natural 3-/5-task PyTorch-Lightning ``.ckpt`` files (and other training frameworks' files) may pickle
Python objects besides the weights (hyper-parameters as an ``argparse.Namespace``, callback states). Loading those
runs pickle code, so datprl never does it implicitly. This tool does it once, on explicit request, for a file you
trust, and writes ``{'params': state_dict}`` that every loader reads with ``weights_only=True``::

    python -m datprl_arch.tools.convert_checkpoint model.ckpt model.pth --trust-pickle

Without ``--trust-pickle`` only files that already load with ``weights_only=True`` are converted (e.g. to strip the
Lightning ``net.`` prefix or a DDP ``module.`` prefix, or to turn a ``.safetensors`` file into a ``.pth``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from ..utils.atomic import atomic_torch_save
from ..utils.checkpoint import CheckpointError, extract_state_dict, load_error_summary, read_checkpoint


def convert(src: str, dst: str, trust_pickle: bool = False, param_key: Optional[str] = None) -> int:
    """Write the network weights of ``src`` to ``dst`` as ``{'params': ...}``; returns the number of tensors."""
    if trust_pickle:
        if not os.path.isfile(src):
            raise CheckpointError(f'checkpoint {src} does not exist')
        try:
            checkpoint = torch.load(src, map_location='cpu', weights_only=False)
        except Exception as err:  # a damaged file fails in many ways (zip reader, unpickler, EOF)
            raise CheckpointError(f'cannot read {src} as a PyTorch checkpoint ({load_error_summary(err)}); the file '
                                  'is truncated, damaged or not a checkpoint') from None
    else:
        checkpoint = read_checkpoint(src)
    state_dict = extract_state_dict(checkpoint, param_key, source=src)
    atomic_torch_save({'params': {k: v.contiguous() for k, v in state_dict.items()}}, dst)
    return len(state_dict)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m datprl_arch.tools.convert_checkpoint',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to read (.pth, .ckpt, .safetensors)')
    parser.add_argument('dst', help='BasicSR weights file to write ({"params": state_dict})')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='load with weights_only=False (runs pickled code: only for files you trust)')
    parser.add_argument('--param-key', help="entry holding the weights (default: detected, e.g. 'params_ema')")
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dst')
    args = parser.parse_args(argv)
    if os.path.exists(args.dst) and not args.overwrite:
        parser.error(f'{args.dst} exists; pass --overwrite to replace it')
    try:
        count = convert(args.src, args.dst, args.trust_pickle, args.param_key)
    except CheckpointError as err:
        hint = '' if args.trust_pickle else ' (if you trust the file, add --trust-pickle)'
        sys.exit(f'convert_checkpoint: error: {err}{hint}')
    sys.stdout.write(f'wrote {count} tensors to {args.dst}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
