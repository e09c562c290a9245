"""Read access to an LMDB for construction-time checks.

py-lmdb >= 2 refuses to open an environment that is already open in the same process; BasicSR datasets keep theirs
open (shared per process by the LMDB backend of ``datprl_arch._compat``). Checks here open the environment only for
the duration of a ``with`` block and close it again, so they never hold a handle that a later dataset or a forked
worker trips on; when the environment is already open, they go through BasicSR's ``FileClient`` instead.
"""
from __future__ import annotations

import os.path as osp
from typing import Iterable

import lmdb


def existing_keys(path: str, keys: Iterable[str]) -> set[str]:
    """The subset of ``keys`` stored in the LMDB at ``path`` (keys only are read when the environment is free)."""
    keys = list(keys)
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=osp.isdir(path))
    except lmdb.Error:
        return _existing_via_file_client(path, keys)
    try:
        with env.begin(write=False) as txn:
            stored = {bytes(k).decode('ascii', 'replace') for k in txn.cursor().iternext(keys=True, values=False)}
    finally:
        env.close()
    return stored.intersection(keys)


def _existing_via_file_client(path: str, keys: list[str]) -> set[str]:
    """Key check through the (shared) LMDB backend that already holds the environment open in this process."""
    from basicsr.utils import FileClient
    try:
        client = FileClient('lmdb', db_paths=[path], client_keys=['check'])
    except lmdb.Error as err:
        raise ValueError(f'Cannot open LMDB {path} a second time in this process ({err}); py-lmdb >= 2 needs the '
                         f'shared LMDB backend that importing datprl_arch installs.') from None
    return {k for k in keys if client.get(k, 'check') is not None}
