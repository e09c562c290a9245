"""CPU threads of a command: ``--threads N`` on every command line, logged.

On a 2-core machine a training run with two torch threads beside another busy process slowed from 0.27 to 3.4 s per
step (its threads spin waiting for a core), while one thread ran at 0.39 s; so the count is the user's to choose.
The default is ``OMP_NUM_THREADS`` when set, else every core the process may use.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

THREADS_FLAG = '--threads'


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is a positive integer, else the cores this process may run on."""
    env = os.environ.get('OMP_NUM_THREADS', '')
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def positive_threads(text: str) -> int:
    """argparse type of ``--threads``: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number of threads (an integer >= 1), got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a number of threads (an integer >= 1), got {value}')
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` with the default of :func:`default_threads`."""
    parser.add_argument(THREADS_FLAG, type=positive_threads, default=None, metavar='N',
                        help='CPU threads of torch (default: OMP_NUM_THREADS, else the cores this process may use; '
                        'use 1 beside other busy processes)')


def pop_threads_flag(argv: Sequence[str], prog: str) -> tuple[list, Optional[int]]:
    """``argv`` without ``--threads N`` / ``--threads=N`` and the value (None when absent), for command lines whose
    parser is BasicSR's (``train``, ``test``). A bad value ends with argparse's message (exit status 2)."""
    parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    add_threads_argument(parser)
    known, rest = parser.parse_known_args(list(argv[1:]))
    return [argv[0], *rest], known.threads


def use_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads to ``threads`` (default :func:`default_threads`); returns the count."""
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads
