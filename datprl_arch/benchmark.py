"""Benchmark checkpoints on a test option file against the degraded input (the identity baseline).

    python -m datprl_arch.benchmark -opt options/demo/md_mini_test.yml [--ckpt A.pth --ckpt B.pth]
                                    [--name NAME] [--metric-bits {native,8}] [--device cpu|cuda]
                                    [--amp bf16|fp16] [--tf32] [--max-pixels P] [--threads N] [--quiet]

Writes ``results/<name>/report.md``, ``report.csv``, ``report.json`` and ``samples.png`` under the current directory
(an existing ``results/<name>/`` is first moved to ``results/<name>_archived_<time>``) and prints the table (input,
restored and gain per set, per domain, overall). See :func:`datprl_arch.evaluation.runner.run_benchmark`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from datprl_arch.data.image_io import ImageDecodeError
from datprl_arch.data.sources import DataSourceError
from datprl_arch.evaluation.metrics import METRIC_BITS, NATIVE
from datprl_arch.evaluation.report import console_table
from datprl_arch.evaluation.runner import BenchmarkError, run_benchmark
from datprl_arch.options import run_pipeline
from datprl_arch.utils.checkpoint import CheckpointError
from datprl_arch.utils.precision import AMP_DTYPES
from datprl_arch.utils.threads import add_threads_argument, use_threads

PROG = 'datprl-benchmark'
#: Errors whose message names the file at fault: printed without a traceback.
USER_ERRORS = (BenchmarkError, CheckpointError, DataSourceError, ImageDecodeError)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('-opt', required=True, help='test option file (BasicSR format)')
    parser.add_argument('--ckpt', action='append', default=[],
                        help="checkpoint to evaluate (repeatable; default: path.pretrain_network_g of the file, else "
                        "'release', the release model shipped in the package)")
    parser.add_argument('--name', help="results/<name>/ (default: the option file's name)")
    parser.add_argument('--metric-bits', choices=METRIC_BITS, default=NATIVE,
                        help='native: 16-bit sources at peak 65535 (default); 8: the figure BasicSR computes')
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='default: cuda if available, else cpu')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES),
                        help='mixed precision: bf16/fp16 on CUDA, bf16 on CPUs with native bf16 (default: float32)')
    parser.add_argument('--tf32', action='store_true', help='float32 matrix products and convolutions on CUDA in '
                        'TF32 (faster, about 3 significant digits; default: full-precision matrix products)')
    parser.add_argument('--max-pixels', type=int, metavar='P', help='restore images above P pixels in tiles under '
                        "their whole-image prompt, as restore does (default: the option file's val.max_pixels, else "
                        'whole images)')
    parser.add_argument('--task-prompts', action='store_true', help="restore each set under its task's own prompt "
                        '(the label) instead of the one the network picks (ExplicitPrompt, LowRankPrompt)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    add_threads_argument(parser)
    return parser.parse_args(argv)


def print_summary(report: dict) -> None:
    """The command's product on stdout: the table, then where the report and the picture are."""
    sys.stdout.write(console_table(report) + '\n')
    sys.stdout.write(f"Report: {report['files']['report_md']} (also .csv, .json)\n"
                     f"Samples: {report['files']['samples_png']}\n")
    if report.get('archived'):
        sys.stdout.write(f"Earlier results of this name: moved to {report['archived']}\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``datprl-benchmark``; bad input ends with one message naming the file (exit status 1)."""
    args = parse_args(argv)
    threads = use_threads(args.threads)

    def pipeline(root: str) -> None:
        print_summary(run_benchmark(args.opt, args.ckpt, name=args.name, metric_bits=args.metric_bits,
                                    device=args.device, quiet=args.quiet, root=root, amp=args.amp,
                                    task_prompts=args.task_prompts, threads=threads, max_pixels=args.max_pixels,
                                    tf32=args.tf32))

    run_pipeline(pipeline, PROG, errors=USER_ERRORS)


if __name__ == '__main__':
    main()
