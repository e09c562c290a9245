"""Read access to an LMDB for construction-time checks, and the checks themselves.

py-lmdb >= 2 refuses to open an environment that is already open in the same process; BasicSR datasets keep theirs
open (shared per process by the LMDB backend of ``datprl_arch._compat``). Checks here open the environment only for
the duration of a ``with`` block and close it again, so they never hold a handle that a later dataset or a forked
worker trips on; when the environment is already open, they go through BasicSR's ``FileClient`` instead.

What is checked before anything is read through the memory map (:func:`check_size`): a ``data.mdb`` shorter than the
pages its meta page records is truncated, and reading it would kill the process with SIGBUS. Then every key listed in
``meta_info.txt`` must be stored, and every value must start with a decodable image header of the listed size
(:func:`inspect_lmdb`; with ``verify``, every PNG chunk checksum too). Every error names the database and the key.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Mapping, Optional

import lmdb

from ...errors import DatprlError
from ..image_io import ImageDecodeError, ImageFormat, header_format, verify_png


class LmdbError(DatprlError, ValueError):
    """An LMDB that cannot be read safely (truncated, damaged pages); the message names the database."""


def data_file(path: str) -> str:
    """The ``data.mdb`` of an LMDB folder (or the file itself for a ``subdir=False`` database)."""
    return osp.join(path, 'data.mdb') if osp.isdir(path) else path


def check_size(path: str, env: lmdb.Environment) -> None:
    """Raise :class:`LmdbError` when ``data.mdb`` is shorter than the pages its meta page says are in use.

    The meta page is read with ``read()``, not through the map, so this is safe on a truncated file; reading a
    page past the end of the file through the map would end the process with SIGBUS."""
    pages, page_size = env.info()['last_pgno'] + 1, env.stat()['psize']
    needed, size = pages * page_size, os.path.getsize(data_file(path))
    if size < needed:
        raise LmdbError(f'LMDB {path}: data.mdb is truncated: it holds {size} bytes, but the database uses {pages} '
                        f'pages of {page_size} bytes ({needed} bytes). Copy it again or rebuild it with '
                        'python -m datprl_arch.tools.make_lmdb.')


def _size_checked(path: str, env: lmdb.Environment) -> lmdb.Environment:
    """``env`` after :func:`check_size`; closed again when the check fails."""
    try:
        check_size(path, env)
    except BaseException:
        env.close()
        raise
    return env


def open_checked(path: str, **options) -> lmdb.Environment:
    """``lmdb.open(path, **options)`` followed by :func:`check_size`; any failure is an :class:`LmdbError`."""
    if osp.isfile(data_file(path)) and os.path.getsize(data_file(path)) == 0:
        raise LmdbError(f'LMDB {path}: data.mdb is empty (0 bytes). Copy it again or rebuild it with '
                        'python -m datprl_arch.tools.make_lmdb.')
    try:
        env = lmdb.open(path, **options)
    except lmdb.Error as err:
        raise LmdbError(f'LMDB {path} cannot be opened ({err}); is data.mdb complete?') from None
    return _size_checked(path, env)


def damaged(path: str, err: Exception, key: Optional[str] = None) -> LmdbError:
    """The error for an ``lmdb.Error`` met while reading ``path`` (at ``key``)."""
    at = f', key {key!r}' if key is not None else ''
    return LmdbError(f'LMDB {path}{at}: the database is damaged ({type(err).__name__}: {err}). Rebuild it with '
                     'python -m datprl_arch.tools.make_lmdb, or copy it again.')


def _read_options(path: str) -> dict:
    return dict(readonly=True, lock=False, readahead=False, subdir=osp.isdir(path))


def _file_client(path: str):
    from basicsr.utils import FileClient
    try:
        return FileClient('lmdb', db_paths=[path], client_keys=['check'])
    except lmdb.Error as err:
        raise LmdbError(f'Cannot open LMDB {path} a second time in this process ({err}); py-lmdb >= 2 needs the '
                        f'shared LMDB backend that importing datprl_arch installs.') from None


def _check_value(value, where: str, shape: Optional[tuple], verify: bool) -> ImageFormat | None:
    """Format of one stored value after its header (and with ``verify`` its PNG checksums) were checked."""
    h, w, fmt = header_format(value, where)
    if shape is not None and (h, w) != tuple(shape[:2]):
        raise ImageDecodeError(f'{where}: the stored image is {h}x{w}, meta_info.txt lists {shape[0]}x{shape[1]}.')
    if verify and bytes(value[:4]) == b'\x89PNG':
        verify_png(value, where)
    return fmt


def inspect_lmdb(path: str, meta: Mapping[str, tuple], verify: bool = False
                 ) -> tuple[set[str], dict[str, ImageFormat | None], list[str]]:
    """Check the values of the keys ``meta`` lists (``{key: (h, w, c)}`` from ``meta_info.txt``).

    Returns ``(missing keys, {key: format}, problems)``: each problem names the database and the key. The size of
    ``data.mdb`` is checked first (:func:`check_size`); a damaged page raises :class:`LmdbError`. Without ``verify``
    only the first bytes of each value (its image header) are read."""
    missing, formats, problems = set(), {}, []
    try:
        env = lmdb.open(path, **_read_options(path))
    except lmdb.Error:
        env = None
    if env is None:  # already open in this process: go through the shared backend
        client = _file_client(path)
        get = lambda key: client.get(key, 'check')  # noqa: E731
        close = lambda: None  # noqa: E731
    else:
        txn = _size_checked(path, env).begin(write=False, buffers=True)
        get = lambda key: txn.get(key.encode('ascii'))  # noqa: E731

        def close():
            txn.abort()
            env.close()
    key = None
    try:
        for key, shape in meta.items():
            value = get(key)
            if value is None:
                missing.add(key)
                continue
            try:
                formats[key] = _check_value(value, f'LMDB {path}, key {key!r}', shape, verify)
            except ImageDecodeError as err:
                problems.append(str(err))
    except lmdb.Error as err:
        raise damaged(path, err, key) from None
    finally:
        close()
    return missing, formats, problems
