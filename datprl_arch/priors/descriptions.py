"""Descriptions files: one JSON object per source mapping image names to text (the domain priors' input).

Keys starting with ``__`` carry metadata (``"__generator__": "MLLM ..."``), not image names. Read by the
multi-domain dataset (``descriptions`` of a source) and by ``python -m datprl_arch.tools.encode_descriptions``.
"""
from __future__ import annotations

import json
import os.path as osp

from ..errors import DatprlError

#: Keys of a descriptions JSON that start with this prefix carry metadata, not image names.
META_PREFIX = '__'


class DescriptionError(DatprlError, ValueError):
    """A descriptions file or encoder option that cannot be used, with the file and key in the message."""


def read_descriptions(path: str) -> dict[str, str]:
    """Image name -> description of one JSON file, metadata keys dropped; every problem names the file and key."""
    if not osp.isfile(path):
        raise DescriptionError(f'descriptions file {path} does not exist')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DescriptionError(f'descriptions file {path} is not readable JSON ({err})') from err
    if not isinstance(data, dict):
        raise DescriptionError(f'descriptions file {path} must hold a JSON object mapping image names to text, '
                               f'e.g. {{"0001.png": "a rainy street"}}; got a {type(data).__name__}')
    texts = {}
    for name, text in data.items():
        if name.startswith(META_PREFIX):
            continue
        if not isinstance(text, str):
            raise DescriptionError(f"descriptions file {path}: key '{name}' maps to a {type(text).__name__}, "
                                   f'expected a text string')
        if not text.strip():
            raise DescriptionError(f"descriptions file {path}: key '{name}' has an empty description")
        texts[name] = text
    if not texts:
        raise DescriptionError(f'descriptions file {path} holds no descriptions (only metadata keys, or empty)')
    return texts
