"""The command lines' allocator setting (datprl_arch.utils.allocator): freed memory is kept for reuse, and the
user's own choice is respected."""
import os
import platform
import subprocess
import sys

import pytest

from datprl_arch.utils import allocator
from datprl_arch.utils.allocator import allocator_choice, keep_freed_memory

GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
ROUNDS = 10
PAGES_PER_ROUND = 3 * (8 << 20) // 4096
#: Allocates and frees three 8 MiB tensors per round; prints whether the setting was made, the page faults of ten
#: rounds and the free bytes glibc holds afterwards (mallinfo2's fordblks).
FAULTS = f"""
import ctypes, resource, torch
from datprl_arch.utils.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                 'keepcost')]
mallinfo2 = ctypes.CDLL('libc.so.6').mallinfo2
mallinfo2.restype = MallInfo2
print(keep_freed_memory())
def rounds(n):
    for _ in range(n):
        tensors = [torch.ones(2 << 20) for _ in range(3)]
        del tensors
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds({ROUNDS})
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, mallinfo2().fordblks)
"""


@pytest.mark.parametrize('environ, reason', [
    ({'DATPRL_SYSTEM_MALLOC': '1'}, 'DATPRL_SYSTEM_MALLOC is set'),
    ({'MALLOC_TRIM_THRESHOLD_': '1000'}, 'MALLOC_TRIM_THRESHOLD_ is set'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1'}, 'GLIBC_TUNABLES is set'),
    ({'LD_PRELOAD': '/usr/lib/libjemalloc.so.2'}, 'LD_PRELOAD names an allocator'),
])
def test_user_settings_are_left_alone(environ, reason):
    assert allocator_choice(environ) == reason
    assert keep_freed_memory(environ) is False


def test_not_glibc_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, 'libc_ver', lambda: ('', ''))
    assert allocator_choice({}) == 'not glibc'


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_other_preloads_and_an_explicit_zero_do_not_opt_out():
    assert allocator_choice({'LD_PRELOAD': '/usr/lib/libgomp.so.1', 'DATPRL_SYSTEM_MALLOC': '0'}) is None


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_freed_memory_is_kept_and_reused_instead_of_faulted_in_again():
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS + (allocator.OPT_OUT,)}
    out = subprocess.run([sys.executable, '-c', FAULTS], env=env, capture_output=True, text=True, check=True)
    kept, faults, free_bytes = out.stdout.split()
    assert kept == 'True'
    assert int(free_bytes) >= 3 * (8 << 20)  # the freed tensors stay in the heap
    # glibc's defaults often return them to the system, and then each round faults its 6,144 pages in again
    assert int(faults) < ROUNDS * PAGES_PER_ROUND / 4


def test_opting_out_changes_nothing():
    env = dict(os.environ, **{allocator.OPT_OUT: '1'})
    out = subprocess.run([sys.executable, '-c', FAULTS], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == 'False'
