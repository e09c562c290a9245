"""Putting built LMDBs in place, and finishing or undoing an install that a killed process left half done.

A build writes ``<db>.partial-<pid>`` (complete once its build record is written); :func:`install` renames the old
``<db>`` aside to ``<db>.old-<pid>``, the partial into place, and removes the old copies only after every database of
the build is in place. :func:`recover_interrupted_installs` looks at the leftovers of processes that no longer run:
when every database of their build is complete (in place or still partial) the install is finished (the new GT
beside the old LQ becomes the new pair), otherwise it is undone (the previous databases are kept).
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Sequence

from ...utils.debris import remove, stale_debris
from .meta import read_build_record


def _partners(path: str, pid: int) -> list[str]:
    """``path`` and the databases its build records (current, new, old) name as its partner."""
    group = [osp.abspath(path)]
    for candidate in (f'{path}.partial-{pid}', path, f'{path}.old-{pid}'):
        record = read_build_record(candidate) if osp.isdir(candidate) else None
        if record and record.get('partner'):
            partner = osp.normpath(osp.join(osp.dirname(osp.abspath(path)), record['partner']))
            if partner not in group:
                group.append(partner)
    return group


def _recover(group: list[str], pid: int) -> str:
    """Finish (every database of process ``pid``'s build is complete) or undo (it is not) its install."""
    partial, old = {p: f'{p}.partial-{pid}' for p in group}, {p: f'{p}.old-{pid}' for p in group}

    def build_of(path):
        record = read_build_record(path) if osp.isdir(path) else None
        return record.get('build') if record else None

    builds = {build_of(partial[p]) for p in group} - {None}
    build = builds.pop() if len(builds) == 1 else None
    if build is not None and all(build in (build_of(partial[p]), build_of(p)) for p in group):
        for p in group:  # GT first, as the interrupted run did
            if osp.isdir(partial[p]):
                if osp.lexists(p):
                    remove(old[p])
                    os.replace(p, old[p])
                os.replace(partial[p], p)
        action = 'finished'
    elif not any(osp.lexists(partial[p]) for p in group) and all(osp.lexists(p) for p in group):
        action = 'already complete (the new databases were in place; the old copies are removed)'
    else:
        for p in group:
            remove(partial[p])
            if not osp.lexists(p) and osp.lexists(old[p]):
                os.replace(old[p], p)
        action = 'undone (the previous databases are kept)'
    for p in group:
        remove(old[p])
    return f'An install of {" + ".join(group)} interrupted in process {pid} was {action}.'


def recover_interrupted_installs(lmdb_paths: Sequence[str]) -> list[str]:
    """Finish or undo the installs that dead processes left half done at ``lmdb_paths`` (and their partners):
    ``<db>.partial-<pid>`` / ``<db>.old-<pid>`` of a process no longer running. Returns what was done (logged)."""
    from basicsr.utils import get_root_logger

    done = []
    for path in lmdb_paths:
        parent = osp.dirname(osp.abspath(path))
        for pid in sorted({d.pid for d in stale_debris(parent, ('partial', 'old'), target=path)}):
            done.append(_recover(_partners(path, pid), pid))
            get_root_logger().warning(done[-1])
    return done


def install(built: Sequence[tuple[str, str]]) -> None:
    """Rename the checked temporary databases ``(tmp, target)`` into place, in order; old ones are renamed aside
    first and removed only after every new one is in place (an interruption is recovered by the next run)."""
    pid = os.getpid()
    for tmp, path in built:
        if osp.lexists(path):
            remove(f'{path}.old-{pid}')
            os.replace(path, f'{path}.old-{pid}')
        os.replace(tmp, path)
    for _, path in built:
        remove(f'{path}.old-{pid}')
