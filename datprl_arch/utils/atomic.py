"""Atomic file writes: write a temporary file next to the target, flush it to disk, then rename over the target.

A process killed mid-write leaves at most a stray ``*.tmp-<pid>`` file; the previous file at the target path stays
complete and loadable.
"""
from __future__ import annotations

import json
import os
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


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path``, atomically."""

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)

    _atomic(path, write)


def atomic_write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON, atomically."""

    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=2)

    _atomic(path, write)
