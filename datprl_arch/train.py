"""Train with BasicSR's own ``train_pipeline`` and this plugin registered.

    python -m datprl_arch.train -opt options/train/FILE.yml [--auto_resume] [--debug] [--launcher ...]
                                [--force_yml train:ema_decay=0.999]
    torchrun --nproc_per_node=N -m datprl_arch.train -opt FILE.yml --launcher pytorch

Same flags as ``basicsr/train.py``, plus ``--threads N`` (CPU threads, logged; default: every core the process may
use; one beside other busy processes); ``experiments/`` and ``tb_logger/`` are written under the current directory.
"""
import os
import sys

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
from basicsr.train import train_pipeline
from datprl_arch.options import run_pipeline
from datprl_arch.utils.threads import pop_threads_flag, use_threads

LOCAL_RANK_FLAG = '--local-rank'


def drop_local_rank_flag(argv: list) -> list:
    """``argv`` without ``--local-rank=N`` / ``--local-rank N``.

    The deprecated ``python -m torch.distributed.launch`` appends that flag (torch >= 2 spells it with a dash), which
    BasicSR's parser rejects; the launcher also exports ``LOCAL_RANK``, which is what ``init_dist`` reads, so the
    flag only fills ``LOCAL_RANK`` where it is missing. Prefer torchrun, which passes nothing."""
    kept, values, args = [], [], iter(argv)
    for arg in args:
        if arg == LOCAL_RANK_FLAG:
            values.append(next(args, ''))
        elif arg.startswith(LOCAL_RANK_FLAG + '='):
            values.append(arg.split('=', 1)[1])
        else:
            kept.append(arg)
    if values and values[-1].isdigit():
        os.environ.setdefault('LOCAL_RANK', values[-1])
    return kept


def main() -> None:
    """Console script ``datprl-train``: a bad option file ends with its message (exit status 1), no traceback."""
    sys.argv, threads = pop_threads_flag(drop_local_rank_flag(sys.argv), 'datprl-train')
    use_threads(threads)
    run_pipeline(train_pipeline, 'datprl-train')


if __name__ == '__main__':
    main()
