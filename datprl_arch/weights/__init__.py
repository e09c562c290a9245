"""Network weights shipped with the package, and the name that selects them.

``md_mini_release.safetensors`` is the release model of MD-Mini (``options/release/md_mini_release.yml``, trained
far past the ten-minute demo; docs/model_card.md says how, on what and how well). ``datprl-restore`` and
``datprl-benchmark`` use it when no checkpoint is given, and ``--ckpt release`` (or ``pretrain_network_g: release``
in an option file) names it. It is a safetensors file (no pickle) whose metadata carries the network options, so
it rebuilds without an option file (:func:`datprl_arch.utils.checkpoint.read_checkpoint`).

This module imports nothing of the package: it only knows where the files are.
"""
from __future__ import annotations

import os

#: The name that stands for the shipped release model wherever a checkpoint path is expected.
RELEASE = 'release'
#: The shipped release model, inside the installed package.
RELEASE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'md_mini_release.safetensors')


def resolve_checkpoint(path: str) -> str:
    """``path``, or the shipped release model's file when ``path`` is :data:`RELEASE`."""
    return RELEASE_FILE if path == RELEASE else path
