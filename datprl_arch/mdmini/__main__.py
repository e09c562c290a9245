"""python -m datprl_arch.mdmini --out datasets/md_mini [--seed 0] [--limit 64] [--sources ...] [--overwrite]"""
import argparse
import logging
import sys

import datprl_arch  # noqa: F401  (basicsr compatibility before any basicsr import)
from datprl_arch.mdmini import DEFAULT_OUT, MiniBuildError, build
from datprl_arch.mdmini.build import DEFAULT_LIMIT, check_limit, check_seed


def _checked(check):
    """An argparse ``type`` that parses an integer and applies ``check``, so a bad value is named as an argparse
    error (exit status 2) before anything is built."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = text
        try:
            check(value)
        except MiniBuildError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    return parse


def main(argv=None) -> int:
    from basicsr.utils import get_root_logger

    parser = argparse.ArgumentParser(prog='python -m datprl_arch.mdmini', description=datprl_arch.mdmini.__doc__)
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'output folder (default {DEFAULT_OUT})')
    parser.add_argument('--seed', type=_checked(check_seed), default=0,
                        help='split, block and degradation seed (an integer >= 0)')
    parser.add_argument('--limit', type=_checked(check_limit), default=DEFAULT_LIMIT,
                        help=f'training blocks per pool (an integer >= 1, default {DEFAULT_LIMIT})')
    parser.add_argument('--sources', nargs='+', help='build only these sources')
    parser.add_argument('--no-unseen', action='store_true', help='skip the out-of-sample check')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier MD-Mini build with other settings')
    args = parser.parse_args(argv)
    get_root_logger().setLevel(logging.INFO)
    try:
        build(args.out, args.seed, args.limit, args.overwrite, args.sources, unseen=not args.no_unseen)
    except (MiniBuildError, RuntimeError) as err:
        parser.exit(2, f'error: {err}\n')
    get_root_logger().info(f'MD-Mini written to {args.out} (option fragments: {args.out}/options_*.yml).')
    return 0


if __name__ == '__main__':
    sys.exit(main())
