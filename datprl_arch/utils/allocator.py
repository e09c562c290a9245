"""Keeping freed memory in the process: glibc's allocator settings for CPU training and inference.

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults, a freed block of several MiB (one activation of a
training step) is handed back to the operating system (trimmed, or unmapped), and the next step's tensors of the
same size fault their pages in again and have them zeroed by the kernel: 20-35 thousand page faults per train step
of the demo network, 12-15 % of its step time on the development machine (docs/benchmarks.md). Raising glibc's
mmap and trim thresholds keeps that memory in the process for reuse, as jemalloc or tcmalloc (which PyTorch's
tuning guide recommends for CPUs) do; the peak resident memory stays the same, since a training step reuses the same
sizes every time.

:func:`keep_freed_memory` is called by this package's command lines (``datprl-train``, ``datprl-test``,
``datprl-benchmark``, ``datprl-restore``, ``bench``), never on import. It changes nothing where the user chose
allocator settings (glibc's ``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, a preloaded allocator), outside glibc, or
with ``DATPRL_SYSTEM_MALLOC=1``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Mapping, Optional

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap, where freed memory is reused (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap up to this much is kept instead of being returned to the system.
TRIM_THRESHOLD = 1 << 30
#: Set to 1 to keep glibc's defaults.
OPT_OUT = 'DATPRL_SYSTEM_MALLOC'
#: Environment variables through which a user has chosen glibc's allocator settings.
USER_SETTINGS = ('MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_', 'MALLOC_MMAP_MAX_',
                 'GLIBC_TUNABLES')
PRELOAD = 'LD_PRELOAD'  # a preloaded allocator (jemalloc, tcmalloc, mimalloc) has 'malloc' in its file name


def allocator_choice(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why the allocator is left alone (the user's setting or opt-out, or not glibc), or None to tune it."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, '') not in ('', '0'):
        return f'{OPT_OUT} is set'
    chosen = [name for name in USER_SETTINGS if environ.get(name)]
    if chosen:
        return f'{chosen[0]} is set'
    if 'malloc' in environ.get(PRELOAD, ''):
        return f'{PRELOAD} names an allocator'
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return 'not glibc'
    return None


def keep_freed_memory(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (module docstring); True when they were set."""
    if allocator_choice(environ) is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
