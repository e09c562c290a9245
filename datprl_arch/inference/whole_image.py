"""Images above a pixel bound restored as the restore command restores them (:class:`.restore.Restorer`): in blended
tiles (:mod:`.tiling`) that all run under the prompt composed from the whole image (from a downscaled view when it
is large). Validation (``val.max_pixels``, ``DATPRLModel.test``) and the benchmark (``--max-pixels``) use it, so a
full-size DIV2K or GoPro frame never needs the memory of one whole-image forward on rank 0 in the middle of training.

Tiles give the untiled output wherever the network's receptive field fits the discarded seam margin (convolutional
networks); a network with global attention (the Restormer's channel attention) differs slightly everywhere.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..archs.prompt import PromptSystem
from .tiling import tiled_apply


def prompt_view(x: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` downscaled (antialiased bilinear) to at most ``PROMPT_VIEW_MAX_SIDE`` on its longer side
    and ``max_pixels`` in area, the view the restore command composes a large image's prompt from; ``x`` itself when
    it fits."""
    from .restore import PROMPT_VIEW_MAX_SIDE

    height, width = x.shape[-2:]
    scale = min(1.0, PROMPT_VIEW_MAX_SIDE / max(height, width), math.sqrt(max_pixels / (height * width)))
    if scale >= 1:
        return x
    size = (max(1, int(height * scale)), max(1, int(width * scale)))
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=True)


def _whole_image_prompt(net: nn.Module, x: torch.Tensor, max_pixels: int):
    """The context the tiles run in: the prompt of the whole image ``x`` fixed, for a network that composes one and
    has none fixed yet (a fixed prompt, e.g. the benchmark's ``--task-prompts``, is kept); else nothing."""
    prompted = isinstance(net, PromptSystem) and net.prompt_width is not None
    if not prompted or getattr(net, '_fixed_prompt', None) is not None:
        return nullcontext()
    return net.fixed_prompt(net.compute_prompt(prompt_view(x, max_pixels)))


def bounded_forward(net: nn.Module, x: torch.Tensor, max_pixels: Optional[int],
                    overlap: Optional[int] = None) -> tuple[torch.Tensor, Optional[int]]:
    """``net(x)`` for ``x`` ``[B, C, H, W]``: in one forward when ``max_pixels`` is None or ``H * W`` fits it, else in
    tiles of the restore command's automatic side for ``max_pixels`` (``overlap`` pixels, default the restore
    command's) under the whole image's prompt. Returns (output ``[B, C', H, W]``, float32 when tiled; the tile side,
    or None for one forward). Call it without autograd (validation, benchmark)."""
    from .restore import DEFAULT_TILE_OVERLAP, auto_tile_side

    height, width = x.shape[-2:]
    if max_pixels is None or height * width <= max_pixels:
        return net(x), None
    overlap = DEFAULT_TILE_OVERLAP if overlap is None else overlap
    side = auto_tile_side(max_pixels, overlap)
    with _whole_image_prompt(net, x, max_pixels):
        return tiled_apply(net, x, side, overlap), side


def min_tiled_pixels(overlap: Optional[int] = None) -> int:
    """The smallest ``max_pixels`` whose automatic tiles exceed the overlap (``auto_tile_side``)."""
    from .restore import AUTO_TILE_MULTIPLE, DEFAULT_TILE_OVERLAP

    overlap = DEFAULT_TILE_OVERLAP if overlap is None else overlap
    side = (overlap // AUTO_TILE_MULTIPLE + 1) * AUTO_TILE_MULTIPLE
    return side * side
