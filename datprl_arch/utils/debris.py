"""Leftovers of interrupted writes: ``<target>.tmp-<pid>`` (atomic file writes), ``<target>.partial-<pid>`` (a
database or folder being built) and ``<target>.old-<pid>`` (the previous version while a new one is swapped in).

Such a name is never read as data: no loader accepts it. A leftover is *stale* when the process that wrote it
(``<pid>``) is no longer running on this machine; only stale ones are removed, so a concurrent writer keeps its
temporary files. ``.old-``/``.partial-`` databases of an interrupted swap are finished or undone by the tool that
made them (``datprl_arch.data.lmdb.install``), not removed blindly.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import shutil
from typing import Iterable, NamedTuple

#: ``<target>.<kind>-<pid>``.
_DEBRIS = re.compile(r'^(?P<target>.+)\.(?P<kind>tmp|partial|old)-(?P<pid>\d+)$')
#: Kinds of leftovers.
KINDS = ('tmp', 'partial', 'old')


class Debris(NamedTuple):
    """One leftover: its path, the path it was meant for, its kind and the writer's process id."""

    path: str
    target: str
    kind: str
    pid: int


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine (also when it belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_debris(path: str) -> Debris | None:
    """The leftover that ``path`` names, or None when it is an ordinary file name."""
    match = _DEBRIS.match(osp.basename(path))
    if match is None:
        return None
    return Debris(path, osp.join(osp.dirname(path), match['target']), match['kind'], int(match['pid']))


def stale_debris(folder: str, kinds: Iterable[str] = KINDS, target: str | None = None) -> list[Debris]:
    """Leftovers of dead processes directly inside ``folder`` (of ``target``'s base name only, when given)."""
    if not osp.isdir(folder):
        return []
    kinds = set(kinds)
    found = []
    for entry in sorted(os.listdir(folder)):
        debris = parse_debris(osp.join(folder, entry))
        if debris is None or debris.kind not in kinds or pid_alive(debris.pid):
            continue
        if target is not None and osp.basename(debris.target) != osp.basename(target):
            continue
        found.append(debris)
    return found


def remove(path: str) -> None:
    """Delete a leftover file or folder."""
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif osp.lexists(path):
        os.remove(path)


def remove_stale_tmp_files(root: str) -> list[str]:
    """Delete the ``*.tmp-<pid>`` files of dead processes anywhere under ``root``; returns their paths."""
    removed = []
    for folder, _, _ in os.walk(root):
        for debris in stale_debris(folder, ('tmp',)):
            try:
                os.remove(debris.path)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                continue
            removed.append(debris.path)
    return removed
