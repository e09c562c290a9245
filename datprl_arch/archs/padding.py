"""Padding of inputs to the size multiple a U-Net needs."""
from __future__ import annotations

import torch
from torch.nn import functional as F

PAD_MODES = ('constant', 'reflect', 'replicate')


def check_pad_mode(mode: str) -> str:
    if mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got '{mode}'")
    return mode


def check_pad_multiple(multiple: int, required: int) -> int:
    """``multiple`` if it is a positive multiple of what the network's downsamplings ``required``."""
    if multiple < required or multiple % required:
        raise ValueError(f'pad_multiple must be a multiple of {required} (the network downsamples by {required}), '
                         f'got {multiple}')
    return multiple


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = 'constant') -> torch.Tensor:
    """Pad ``[B, C, H, W]`` on the bottom and right to the next multiple of ``multiple``.

    ``constant`` (zeros) is what the official networks do and what their weights were trained with; the padded
    border also feeds the prompt queries, so keep it for official checkpoints.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
