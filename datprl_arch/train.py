"""Train with BasicSR's own ``train_pipeline`` and this plugin registered.

    python -m datprl_arch.train -opt options/train/FILE.yml [--auto_resume] [--debug] [--launcher ...]
                                [--force_yml train:ema_decay=0.999]

Same flags as ``basicsr/train.py``; ``experiments/`` and ``tb_logger/`` are written under the current directory.
"""
import os
import sys

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from basicsr.train import train_pipeline
from datprl_arch.options import OptionFileError


def main() -> None:
    """Console script ``datprl-train``: a bad option file ends with its message (exit status 1), no traceback."""
    try:
        train_pipeline(os.getcwd())
    except OptionFileError as err:
        sys.exit(f'datprl-train: error: {err}')


if __name__ == '__main__':
    main()
