"""Fit a checkpoint's detection head (domain and task with calibrated probabilities) and guard thresholds on its
validation split, and write a copy of the checkpoint that carries them; the input checkpoint is never modified::

    python -m datprl_arch.tools.calibrate --ckpt experiments/NAME/models/net_g_latest.pth \\
        -opt options/demo/md_mini_val.yml
    python -m datprl_arch.tools.calibrate --ckpt release -opt options/demo/md_mini_val.yml \\
        --out release_head.safetensors --test options/demo/md_mini_test.yml --test options/demo/md_mini_unseen.yml

The figures are printed: out-of-fold accuracy and expected calibration error on the validation split, the guard
thresholds, and with ``--test`` the head's accuracy and calibration on those sets. The library is
:mod:`datprl_arch.inference.calibration`; ``datprl-restore --explain`` and ``--guard`` use the head.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from basicsr.utils import get_root_logger
from datprl_arch.inference.calibration import calibrate, summary_line
from datprl_arch.inference.detection import DetectionError
from datprl_arch.inference.restore import RestoreError
from datprl_arch.options import OptionFileError
from datprl_arch.utils.atomic import atomic_write_json
from datprl_arch.utils.checkpoint import CheckpointError
from datprl_arch.utils.threads import add_threads_argument, use_threads
from datprl_arch.weights import RELEASE, RELEASE_FILE

PROG = 'python -m datprl_arch.tools.calibrate'
#: Suffix of the default output file's stem.
OUT_SUFFIX = '_calibrated'


def default_out(ckpt: str) -> str:
    """``<stem>_calibrated<ext>`` beside ``ckpt``; for the shipped release model, in the current directory (the
    package's files are never written)."""
    path = os.path.basename(RELEASE_FILE) if ckpt == RELEASE else ckpt
    stem, ext = os.path.splitext(path)
    return f'{stem}{OUT_SUFFIX}{ext}'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('--ckpt', required=True, help=f'checkpoint (.pth or .safetensors; {RELEASE!r}: the shipped '
                        'release model)')
    parser.add_argument('-opt', required=True, help='option file of the validation sets (domain and task labels; '
                        'its network_g for checkpoints that carry none)')
    parser.add_argument('--out', help=f'checkpoint to write (default <ckpt stem>{OUT_SUFFIX}<ext>, in the current '
                        'folder for release); the format of --ckpt')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    parser.add_argument('--param-key', help='weights entry (default: params_ema, else params)')
    parser.add_argument('--device', help='cpu, cuda, ... (default: cuda when available, else cpu)')
    parser.add_argument('--test', action='append', default=[], metavar='OPT.yml',
                        help='also measure the head on the sets of this option file (repeatable)')
    parser.add_argument('--json', metavar='FILE', help='write the figures as JSON')
    parser.add_argument('--quiet', action='store_true', help='no information messages')
    add_threads_argument(parser)
    return parser


def figure_lines(result: dict) -> list[str]:
    """What the command prints: validation figures, guard thresholds, per test file its sets and overall."""
    guard = result['head'].guard
    lines = [f"Detection head written to {result['out']}",
             f"validation (out of fold): {summary_line(result['validation'])}",
             f'guard: task confidence below {guard.min_confidence:.3f}; change (PSNR output vs input, dB) below: '
             + ', '.join(f'{task} {low:.1f}' for task, (low, _) in guard.change_db.items())]
    for test, summary in result['tests'].items():
        lines.append(f'{test}: {summary_line(summary)}')
        for set_name, figures in summary['sets'].items():
            lines.append(f'  {set_name}: ' + ', '.join(f'{k} {f["accuracy"]:.0%}' for k, f in figures.items()))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry; a bad request ends with one message (exit status 1), no traceback."""
    args = build_parser().parse_args(argv)
    get_root_logger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    use_threads(args.threads)
    out = args.out or default_out(args.ckpt)
    if os.path.exists(out) and not args.overwrite:
        sys.exit(f'{PROG}: error: {out} exists; pass --overwrite to replace it, or choose another --out')
    try:
        result = calibrate(args.ckpt, args.opt, out, args.param_key, args.device, tuple(args.test))
    except (DetectionError, RestoreError, CheckpointError, OptionFileError) as err:
        sys.exit(f'{PROG}: error: {err}')
    sys.stdout.write('\n'.join(figure_lines(result)) + '\n')
    if args.json:
        atomic_write_json({'out': result['out'], 'validation': result['validation'], 'tests': result['tests'],
                           'head': result['head'].to_dict()}, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
