"""Output folders of the runners: never replaced in place, and refused with a message when they cannot be written.

BasicSR's train and test runners move an existing ``experiments/<name>/`` or ``results/<name>/`` aside
(``<name>_archived_<time>``: ``basicsr.utils.misc.mkdir_and_rename``) before writing; :func:`archive_and_create`
does the same for the benchmark. A folder that cannot be written (a read-only mount, missing permissions) would end
in a raw ``OSError`` traceback: :func:`check_writable` names it before anything is read or written.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Optional

from basicsr.utils.misc import get_time_str

from ..errors import DatprlError

#: What BasicSR's ``mkdir_and_rename`` puts between a folder's name and the time when it moves the folder aside.
ARCHIVE_SUFFIX = '_archived_'


class OutputFolderError(DatprlError, OSError):
    """An output folder that cannot be created, moved aside or written; the message names it."""


def _nearest_existing(path: str) -> str:
    """``path`` or the nearest folder above it that exists."""
    path = osp.abspath(path)
    while not osp.isdir(path) and osp.dirname(path) != path:
        path = osp.dirname(path)
    return path


def unwritable_reason(folder: str) -> Optional[str]:
    """Why files cannot be created in the existing ``folder`` (a read-only file system, permissions), or None."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return 'on a read-only file system' if read_only else 'not writable by this user'


def check_writable(folder: str, what: str, inside: bool = False) -> None:
    """Raise :class:`OutputFolderError` naming ``folder`` (``what``: 'the experiment folder', ...) when it cannot be
    created or moved aside: the nearest existing folder above it must be writable. With ``inside`` (a resumed run
    writes into it) an existing ``folder`` must be writable itself. (A folder that is itself a mount point cannot be
    renamed either; that shows only when the rename fails: :func:`archive_and_create`.)"""
    folder = osp.abspath(folder)
    targets = [_nearest_existing(osp.dirname(folder))]
    if osp.isdir(folder) and inside:
        targets.append(folder)
    for target in targets:
        why = unwritable_reason(target)
        if why:
            raise OutputFolderError(f'{what} {folder} cannot be written: {target} is {why}. Run from a writable '
                                    f'folder (outputs go under the current directory), or make {target} writable.')


def archive_and_create(folder: str, what: str) -> Optional[str]:
    """Create ``folder``, first moving an existing one aside as BasicSR's runners do (``<folder>_archived_<time>``,
    with ``_2``, ``_3``, ... when that name is taken); return the archive's path, or None. Nothing is replaced in
    place; a folder that cannot be written or moved raises :class:`OutputFolderError` naming it."""
    check_writable(folder, what)
    archived = None
    try:
        if osp.lexists(folder):
            base = f'{folder}{ARCHIVE_SUFFIX}{get_time_str()}'
            archived, number = base, 1
            while osp.lexists(archived):
                number += 1
                archived = f'{base}_{number}'
            os.rename(folder, archived)
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        moving = archived is not None and osp.lexists(folder)
        action = f'moved aside to {archived}' if moving else 'created'
        hint = ' A mount point or a folder in use cannot be renamed: choose another name, or move it away.' \
            if moving else ''
        raise OutputFolderError(f'{what} {folder} cannot be {action} ({err.strerror or err}).{hint}') from None
    return archived


def mkdir_and_rename(path: str) -> None:
    """Replacement for ``basicsr.utils.misc.mkdir_and_rename`` (the train and test runners' output folders): the
    same move aside and notice, with a unique archive name and a failure that names the folder."""
    archived = archive_and_create(path, 'the output folder')
    if archived:
        print(f'Path already exists. Rename it to {archived}', flush=True)  # BasicSR's own notice, before any logger
