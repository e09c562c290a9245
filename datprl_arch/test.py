"""Evaluate with BasicSR's own ``test_pipeline`` and this plugin registered.

    python -m datprl_arch.test -opt options/test/FILE.yml [--force_yml val:save_img=false]

Same flags as ``basicsr/test.py``, plus ``--threads N`` (CPU threads, logged); ``results/<name>/`` (log, metrics,
images) is written under the current directory.
"""
import sys

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from basicsr.test import test_pipeline
from datprl_arch.options import run_pipeline
from datprl_arch.utils.threads import pop_threads_flag, use_threads


def main() -> None:
    """Console script ``datprl-test``: a bad option file ends with its message (exit status 1), no traceback."""
    sys.argv, threads = pop_threads_flag(sys.argv, 'datprl-test')
    use_threads(threads)
    run_pipeline(test_pipeline, 'datprl-test')


if __name__ == '__main__':
    main()
