"""Restore your own images with a trained checkpoint.

    python -m datprl_arch.restore INPUT OUTPUT          (the shipped release model, docs/model_card.md)
    python -m datprl_arch.restore --ckpt experiments/NAME/models/net_g_latest.pth INPUT OUTPUT
    python -m datprl_arch.restore --ckpt official.pth --opt options/test/FILE.yml photos/ restored/ --tile 512

    python -m datprl_arch.restore --ckpt explicit.pth INPUT OUTPUT --task derain
    python -m datprl_arch.restore --ckpt explicit.pth INPUT OUTPUT --blend derain:dehaze:0.3
    python -m datprl_arch.restore --ckpt net_g_latest_calibrated.pth INPUT OUTPUT --explain --guard

INPUT is an image or a folder (PNG, TIFF, JPEG; 8/16-bit; gray or colour), OUTPUT a file or a folder; outputs keep
the input's name, bit depth and channels (an alpha channel is written back unchanged; a palette PNG is written in full
colour). An image that cannot be read is named and skipped; the others are restored, and the exit status is 1.
``--task``/``--blend`` fix the prompt of every image
(:mod:`datprl_arch.inference.prompt_control`). ``--explain`` writes ``restore_report.csv``/``.json`` beside the
outputs and ``--guard`` keeps or blends towards the input what the network should leave alone, with the detection
head of a checkpoint calibrated by ``tools.calibrate`` (:mod:`datprl_arch.inference.guard`). The library is
:mod:`datprl_arch.inference.restore`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from basicsr.utils import get_root_logger
from datprl_arch.inference.detection import DetectionError
from datprl_arch.inference.guard import REPORT_CSV, REPORT_JSON, load_explainer, write_restore_report
from datprl_arch.inference.restore import (AMP_DTYPES, DEFAULT_TILE_OVERLAP, MAX_PIXELS_PER_FORWARD, RestoreError,
                                           load_restorer, plan_jobs, restore_files)
from datprl_arch.options import OptionFileError
from datprl_arch.utils.allocator import keep_freed_memory
from datprl_arch.utils.checkpoint import CheckpointError
from datprl_arch.utils.precision import use_tf32
from datprl_arch.utils.threads import add_threads_argument, use_threads
from datprl_arch.weights import RELEASE

PROG = 'datprl-restore'
#: Whether the guard is on without --guard/--no-guard (off until it is measured on the release model, issue 28).
DEFAULT_GUARD = False


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'expected an integer >= {minimum}, got {value}')
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description='Restore images with a trained DATPRL checkpoint.')
    parser.add_argument('input', metavar='INPUT', help='an image or a folder of images (PNG, TIFF, JPEG)')
    parser.add_argument('output', metavar='OUTPUT', help='an image file, or a folder (created) for the results')
    parser.add_argument('--ckpt', default=RELEASE, help='checkpoint (.pth, .ckpt or .safetensors); default '
                        f'{RELEASE!r}: the release model shipped in the package (docs/model_card.md)')
    parser.add_argument('--opt', help='option file whose network_g describes the network (for checkpoints that '
                        'do not carry network_g, e.g. official ones)')
    parser.add_argument('--param-key', help='weights entry of the checkpoint (default: params_ema, else params)')
    parser.add_argument('--device', help='cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES),
                        help='mixed precision: bf16/fp16 on CUDA, bf16 on CPUs with native bf16')
    parser.add_argument('--tf32', action='store_true', help='float32 matrix products and convolutions on CUDA in '
                        'TF32 (faster, about 3 significant digits; default: full-precision matrix products)')
    parser.add_argument('--tile', type=_int_at_least(1), metavar='N', help='restore images whose longer side '
                        'exceeds N in N x N tiles (default: only images above --max-pixels are tiled)')
    parser.add_argument('--tile-overlap', type=_int_at_least(0), default=DEFAULT_TILE_OVERLAP, metavar='M',
                        help=f'overlap of neighbouring tiles in pixels (default {DEFAULT_TILE_OVERLAP})')
    parser.add_argument('--max-pixels', type=_int_at_least(1), default=MAX_PIXELS_PER_FORWARD, metavar='P',
                        help='without --tile, images above P pixels are restored in tiles of about sqrt(P) '
                        f'(default {MAX_PIXELS_PER_FORWARD})')
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument('--task', metavar='NAME', help="restore under task NAME's own prompt (checkpoints whose "
                        'prompt type has a prompt per task: ExplicitPrompt, LowRankPrompt)')
    prompt.add_argument('--blend', metavar='A:B:ALPHA', help='restore under (1-ALPHA) x prompt A + ALPHA x prompt B; '
                        'A and B are task names or reference images (whose composed prompt is used)')
    parser.add_argument('--explain', action='store_true', help=f'write {REPORT_CSV} and {REPORT_JSON} beside the '
                        'outputs: detected domain and task with probabilities (checkpoints calibrated by '
                        'tools.calibrate), change (PSNR of output vs input), tiles, time, what the guard did')
    parser.add_argument('--guard', action=argparse.BooleanOptionalAction, default=DEFAULT_GUARD,
                        help='keep the input of an image judged clean or of an unsure task, and blend towards the '
                        'input a change larger than on validation images of the detected task (needs a calibrated '
                        f'checkpoint; writes the report too; default {"on" if DEFAULT_GUARD else "off"})')
    parser.add_argument('--quiet', action='store_true', help='no progress bar and no information messages')
    add_threads_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``datprl-restore``: exit status 0, or 1 when an image failed; a bad request ends with its
    message (exit status 1), no traceback."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    get_root_logger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    threads = use_threads(args.threads)
    try:
        jobs = plan_jobs(args.input, args.output)
        restorer = load_restorer(args.ckpt, args.opt, args.param_key, args.device, args.amp, args.tile,
                                 args.tile_overlap, args.max_pixels, args.task, args.blend)
        explainer = load_explainer(restorer, args.ckpt, args.explain, args.guard)
    except (RestoreError, CheckpointError, OptionFileError, DetectionError) as err:
        sys.exit(f'{PROG}: error: {err}')
    get_root_logger().info(f'CPU threads: {threads}')
    if args.tf32:
        get_root_logger().info(use_tf32(restorer.device))
    records = []
    failures = restore_files(restorer, jobs, progress=not args.quiet, explainer=explainer, records=records)
    if explainer is not None:
        write_restore_report(records, [dst for _, dst in jobs], args.ckpt, explainer)
    if failures:
        sys.stderr.write(f'{PROG}: {len(failures)} of {len(jobs)} images failed:\n'
                         + ''.join(f'  {message}\n' for message in failures))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
