"""Atomic file writes: write a temporary file next to the target, flush it to disk, then rename over the target.

A process killed mid-write leaves at most a stray ``*.tmp-<pid>`` file; the previous file at the target path stays
complete and loadable.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Callable

import torch


def _atomic(path: str, write: Callable[[str], None]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_file(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the file's content to ``tmp``; it is then renamed over ``path`` (see the module)."""
    _atomic(path, write)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path``, atomically."""

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)

    _atomic(path, write)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, mappings as dicts, tuples as lists: what
    strict JSON can hold (Python's ``json`` would write bare ``NaN``, which other readers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}  # insertion order kept
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented, strict JSON (non-finite floats become null, see :func:`json_safe`), atomically."""
    safe = json_safe(obj)

    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(safe, f, indent=2, allow_nan=False)

    _atomic(path, write)
