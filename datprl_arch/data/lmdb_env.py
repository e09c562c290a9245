"""Short-lived read access to an LMDB for construction-time checks.

py-lmdb >= 2 refuses to open an environment that is already open in the same process; BasicSR datasets keep theirs
open (through the shared backend of ``datprl_arch._compat``). Checks here open the environment only for the duration
of a ``with`` block and close it again, so they never hold a handle that a later dataset or a forked worker trips on.
"""
from __future__ import annotations

import contextlib
import os.path as osp
from typing import Iterator

import lmdb


@contextlib.contextmanager
def read_env(path: str) -> Iterator[lmdb.Environment]:
    """Yield a read-only environment for ``path``; closes it afterwards unless it was shared and already open."""
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=osp.isdir(path))
    except lmdb.Error as err:
        shared = _shared_env(path)
        if shared is None:
            raise ValueError(f'Cannot open LMDB {path}: {err}') from None
        yield shared
        return
    try:
        yield env
    finally:
        env.close()


def _shared_env(path: str):
    """The environment the compat layer already holds open for ``path`` in this process, if any."""
    from datprl_arch import _compat
    getter = getattr(_compat, 'shared_lmdb_env', None)
    return getter(path) if getter is not None else None
