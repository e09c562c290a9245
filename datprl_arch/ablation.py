"""What the prompts buy on MD-Mini: the prompt-free backbone, the task pool only and full DATPRL, each trained for
several seeds at the demo's budget, benchmarked side by side (``make demo-ablation``).

    python -m datprl_arch.ablation [--seeds 0 1 2] [--configs A.yml B.yml ...] [--test options/demo/md_mini_test.yml]
                                   [--name datprl_md_mini_ablation] [--force_yml train:total_iter=500 ...] [--quiet]

Finished runs (``experiments/<name>_seed<S>/models/net_g_latest.pth``) are reused; interrupted ones resume.
Writes ``results/<name>/ablation.md`` / ``ablation.json`` beside the benchmark's own report.
"""
import argparse
import sys

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from datprl_arch.benchmark import USER_ERRORS
from datprl_arch.evaluation.ablation import run_ablation
from datprl_arch.options import run_pipeline

PROG = 'datprl-ablation'

CONFIGS = ('options/demo/md_mini_baseline.yml', 'options/demo/md_mini_taskpool.yml', 'options/demo/md_mini_train.yml')
SEEDS = (0, 1, 2)


def main(argv=None) -> None:
    """``make demo-ablation``; bad input ends with one message naming the file (exit status 1)."""
    parser = argparse.ArgumentParser(prog='python -m datprl_arch.ablation', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), help='training option files to compare')
    parser.add_argument('--seeds', nargs='+', type=int, default=list(SEEDS), help='manual_seed of each run')
    parser.add_argument('--test', default='options/demo/md_mini_test.yml', help='test option file of the benchmark')
    parser.add_argument('--name', default='datprl_md_mini_ablation', help='results/<name>/')
    parser.add_argument('--force_yml', nargs='+', default=[], help='extra overrides of every training run')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    args = parser.parse_args(argv)

    def pipeline(root: str) -> None:
        summary = run_ablation(args.configs, args.test, args.seeds, args.name, root=root,
                               train_overrides=args.force_yml, quiet=args.quiet)
        sys.stdout.write(summary['markdown'])

    run_pipeline(pipeline, PROG, errors=USER_ERRORS)


if __name__ == '__main__':
    main()
