"""Tiled application of an image-to-image function ``[B, C, H, W] -> [B, C', H, W]`` with overlap blending.

Tiles of ``tile`` x ``tile`` pixels step by ``tile - overlap``; the last tile of a row or column is moved back to end
at the image border, so every tile has the full size (an image side shorter than ``tile`` gives one tile of that
side). Each tile's output is weighted by a separable window that is 1 inside and on sides at the image border, and on
sides shared with a neighbour is 0 over the outer :data:`SEAM_MARGIN_FRACTION` of the overlap (where the tile lacked
context) and rises with a raised-cosine ramp over the middle. The windows are divided by their sum, so the weights
sum to one at every pixel, borders included; two tiles that overlap by exactly ``overlap`` have complementary ramps.

A network whose receptive-field radius is at most ``overlap * SEAM_MARGIN_FRACTION`` (e.g. overlap 12 for three
3x3 convolutions) therefore gives the untiled output everywhere; a larger one differs only near the seams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

#: Fraction of the overlap next to a tile's inner edge that gets weight 0, on each side of a seam.
SEAM_MARGIN_FRACTION = 0.25


@dataclass(frozen=True)
class Tile:
    """One tile: its top-left corner and size in pixels."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


def check_tiling(tile: int, overlap: int) -> None:
    """``tile`` >= 1 and 0 <= ``overlap`` < ``tile``, else ``ValueError``."""
    if tile < 1:
        raise ValueError(f'tile size must be at least 1 pixel, got {tile}')
    if not 0 <= overlap < tile:
        raise ValueError(f'tile overlap must be in [0, tile size {tile}), got {overlap}')


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles along a side of ``length`` pixels; consecutive tiles overlap by at least ``overlap``."""
    check_tiling(tile, overlap)
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The tiles that cover an ``height`` x ``width`` image, row by row."""
    th, tw = min(tile, height), min(tile, width)
    return [Tile(top, left, th, tw) for top in tile_starts(height, tile, overlap)
            for left in tile_starts(width, tile, overlap)]


def edge_ramp(overlap: int) -> torch.Tensor:
    """Rising weights ``[overlap - margin]`` of a tile side shared with a neighbour: ``margin`` zeros, then a
    raised cosine that a neighbour's mirrored ramp complements to one."""
    margin = int(overlap * SEAM_MARGIN_FRACTION)
    rise = overlap - 2 * margin
    cosine = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(rise, dtype=torch.float64) + 0.5) / rise)
    return torch.cat([torch.zeros(margin, dtype=torch.float64), cosine])


def side_window(start: int, size: int, length: int, overlap: int) -> torch.Tensor:
    """Weights ``[size]`` of a tile covering ``[start, start + size)`` of a side of ``length`` pixels: the ramp on
    each end inside the image, 1 elsewhere."""
    window = torch.ones(size, dtype=torch.float64)
    ramp = edge_ramp(overlap)
    if start > 0:
        window[:len(ramp)] *= ramp
    if start + size < length:
        window[size - len(ramp):] *= ramp.flip(0)
    return window


def blend_weights(height: int, width: int, tile: int, overlap: int) -> Iterator[tuple[Tile, torch.Tensor]]:
    """Each tile of the image with its blending weights ``[tile.height, tile.width]`` (float32); over all tiles the
    weights sum to one at every pixel."""
    tiles = plan_tiles(height, width, tile, overlap)
    windows = [torch.outer(side_window(t.top, t.height, height, overlap), side_window(t.left, t.width, width, overlap))
               for t in tiles]
    total = torch.zeros(height, width, dtype=torch.float64)
    for t, window in zip(tiles, windows):
        total[t.rows, t.cols] += window
    for t, window in zip(tiles, windows):
        yield t, (window / total[t.rows, t.cols]).float()


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int,
                overlap: int) -> torch.Tensor:
    """``fn`` applied to ``x`` ``[B, C, H, W]`` tile by tile, blended: ``[B, C', H, W]`` float32 on ``x``'s device.

    ``fn`` maps a tile ``[B, C, h, w]`` to ``[B, C', h, w]`` (on any device): only one tile is processed at a time.
    """
    height, width = x.shape[-2:]
    out = None
    for t, weight in blend_weights(height, width, tile, overlap):
        y = fn(x[..., t.rows, t.cols])
        if y.shape[-2:] != (t.height, t.width):
            raise ValueError(f'tiled_apply needs a size-preserving function: a {t.height}x{t.width} tile gave '
                             f'{tuple(y.shape[-2:])}')
        if out is None:
            out = torch.zeros(*y.shape[:-2], height, width, dtype=torch.float32, device=x.device)
        out[..., t.rows, t.cols] += y.to(out.device, torch.float32) * weight.to(out.device)
    return out
