"""Turn a trained checkpoint into a shippable weights file: its EMA network as safetensors, in float16, with the
network options and the provenance (source checkpoint, iteration, recipe, commit) in the header.

    python -m datprl_arch.tools.release --ckpt experiments/datprl_md_mini_release/models/net_g_latest.pth \\
        --recipe options/release/md_mini_release.yml --out datprl_arch/weights/md_mini_release.safetensors

The file loads without pickle and rebuilds without an option file (``datprl-restore --ckpt FILE``); the shipped
one is what ``--ckpt release`` names (:mod:`datprl_arch.weights`). An existing ``--out`` is replaced only with
``--overwrite``; the write is atomic.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import subprocess
import sys
from typing import Optional, Sequence

import torch

from ..utils.checkpoint import (PARAM_KEYS, CheckpointError, extract_state_dict, file_sha256, network_options,
                                read_checkpoint, save_safetensors)
from ..version import __version__
from ..weights import RELEASE_FILE, resolve_checkpoint

PROG = 'python -m datprl_arch.tools.release'
#: Storage dtypes a release file may use (float16 halves the file; the network computes in float32 or bf16).
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}
#: Largest file the package ships (the issue's bound; a larger network needs another way to be distributed).
MAX_SHIPPED_BYTES = 10 * 1024 * 1024


def checkpoint_iteration(ckpt: str) -> Optional[int]:
    """The iteration a BasicSR ``net_g_<iter>.pth`` was saved at; for ``net_g_latest.pth``, that of the newest
    training state beside it (``../training_states/<iter>.state``); None when neither tells."""
    match = re.fullmatch(r'net_g_(\d+)\.pth', os.path.basename(ckpt))
    if match:
        return int(match[1])
    states = glob.glob(os.path.join(os.path.dirname(os.path.abspath(ckpt)), os.pardir, 'training_states', '*.state'))
    iters = [int(m[1]) for m in (re.fullmatch(r'(\d+)\.state', os.path.basename(s)) for s in states) if m]
    return max(iters) if iters else None


def git_commit() -> str:
    """The commit of the working tree this runs in, or 'unknown' outside a git checkout."""
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def release(ckpt: str, out: str, recipe: Optional[str] = None, dtype: str = 'fp16',
            param_key: Optional[str] = None) -> dict:
    """Write the network of ``ckpt`` (``params_ema`` preferred) to ``out``; returns the header's metadata plus the
    file's ``sha256`` and ``bytes``. Raises ``CheckpointError`` for a checkpoint without network options."""
    checkpoint = read_checkpoint(ckpt)
    network = network_options(checkpoint)
    if network is None:
        raise CheckpointError(f'{ckpt} carries no network_g options (checkpoints this package saves do); a release '
                              'file must rebuild without an option file')
    key = param_key or next((k for k in PARAM_KEYS if k in checkpoint), None)
    state_dict = extract_state_dict(checkpoint, key, source=ckpt)
    iteration = checkpoint_iteration(ckpt)
    metadata = {
        'format': 'datprl-network-v1', 'param_key': key or 'state_dict', 'dtype': dtype,
        'source_checkpoint': os.path.abspath(ckpt), 'source_sha256': file_sha256(resolve_checkpoint(ckpt)),
        'iteration': str(iteration) if iteration is not None else 'unknown',
        'recipe': recipe or 'unknown', 'commit': git_commit(), 'datprl_version': __version__,
        'torch_version': torch.__version__,
        'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
    }
    save_safetensors(state_dict, out, network, metadata, DTYPES[dtype])
    return {**metadata, 'sha256': file_sha256(out), 'bytes': os.path.getsize(out),
            'parameters': sum(v.numel() for v in state_dict.values())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('--ckpt', required=True, help='trained checkpoint (net_g_*.pth of a training run)')
    parser.add_argument('--out', default=RELEASE_FILE, help=f'safetensors file to write (default: {RELEASE_FILE})')
    parser.add_argument('--recipe', help='the option file that trained it (recorded in the header)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp16', help='storage dtype (default fp16)')
    parser.add_argument('--param-key', help='weights entry (default: params_ema, else params)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f'{args.out} exists; pass --overwrite to replace it')
    try:
        info = release(args.ckpt, args.out, args.recipe, args.dtype, args.param_key)
    except CheckpointError as err:
        sys.exit(f'{PROG}: error: {err}')
    sys.stdout.write(f"wrote {args.out}: {info['parameters']:,} values, {info['bytes'] / 2 ** 20:.2f} MiB, "
                     f"iteration {info['iteration']}, sha256 {info['sha256']}\n")
    if info['bytes'] > MAX_SHIPPED_BYTES:
        sys.stderr.write(f'{PROG}: warning: {args.out} is larger than the {MAX_SHIPPED_BYTES >> 20} MiB the package '
                         'ships\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
