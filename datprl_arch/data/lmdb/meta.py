"""What a BasicSR LMDB carries besides its values: ``meta_info.txt`` and datprl's build record.

``meta_info.txt`` has one line ``<key>.png (<h>,<w>,<c>) <compress level>`` per stored image (BasicSR's format).
The build record (:data:`BUILD_FILE`, JSON; BasicSR ignores it) names the build that wrote the database, a digest of
its content and, for a GT/LQ pair, the partner's path and content digest, so a dataset can tell a GT and an LQ
database of different builds apart.
"""
from __future__ import annotations

import json
import os.path as osp
import re
from typing import Optional

from ..image_io import IMAGE_SUFFIXES

#: The list of stored images inside a database.
META_FILE = 'meta_info.txt'
#: File inside a database written by make_lmdb that identifies its build (BasicSR ignores it).
BUILD_FILE = 'datprl_build.json'
#: ``format`` entry of a build record.
BUILD_FORMAT = 'datprl-lmdb-build'
#: Version of the build record's fields.
BUILD_VERSION = 1
#: One line of BasicSR's meta_info.txt: ``<name> (<h>,<w>,<c>) <compress level>``.
_META_LINE = re.compile(r'^(?P<name>\S.*?)\s+\((?P<h>\d+),\s*(?P<w>\d+),\s*(?P<c>\d+)\)(?:\s+(?P<level>\d+))?\s*$')


def meta_line(key: str, shape: tuple[int, int, int], compress_level: int) -> str:
    """The ``meta_info.txt`` line of the PNG value stored under ``key`` with shape ``(h, w, c)``."""
    h, w, c = shape
    return f'{key}.png ({h},{w},{c}) {compress_level}\n'


def read_lmdb_meta(lmdb_root: str) -> dict[str, tuple[int, int, int]]:
    """Parse ``meta_info.txt`` of a BasicSR LMDB into ``{key: (h, w, c)}`` (key = name without image suffix).

    Unlike BasicSR's ``split('.')[0]`` this keeps dots inside names; raises ``ValueError`` on a malformed line.
    """
    meta = {}
    path = osp.join(lmdb_root, META_FILE)
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            match = _META_LINE.match(line.strip())
            if match is None:
                raise ValueError(f'{path}:{number}: expected "<name>.png (h,w,c) <level>", got {line.strip()!r}.')
            key = match['name']
            if key.lower().endswith(IMAGE_SUFFIXES):
                key = osp.splitext(key)[0]
            meta[key] = (int(match['h']), int(match['w']), int(match['c']))
    return meta


def build_record(build: str, role: str, content: str, entries: int, partner: Optional[str] = None,
                 partner_content: Optional[str] = None) -> dict:
    """The build record of one database: ``role`` is ``single``, ``gt`` or ``lq``; ``partner`` the pair's other
    database relative to this one's folder."""
    return {'format': BUILD_FORMAT, 'version': BUILD_VERSION, 'build': build, 'role': role, 'content': content,
            'entries': entries, 'partner': partner, 'partner_content': partner_content}


def read_build_record(path: str) -> Optional[dict]:
    """The build record make_lmdb wrote into the database at ``path`` (see the module docstring), or None."""
    record_path = osp.join(path, BUILD_FILE)
    if not osp.isfile(record_path):
        return None
    try:
        with open(record_path, encoding='utf-8') as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get('format') == BUILD_FORMAT else None
