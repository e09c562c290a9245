"""The benchmark's picture: per set one crop of the image with the largest PSNR gain, placed where the restoration
removed the most error, laid out input | restored (one per checkpoint) | ground truth, each labelled with the
image's PSNR, the set named above its row. Non-8-bit sources are windowed (a percentile stretch of the ground-truth
crop, the same window on every tile of the row) so that 16-bit medical images are visible."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np

from ..data.image_io import write

#: Crop side on the image (pixels) and the side of a picture cell it is enlarged into (nearest neighbour).
CROP, CELL = 96, 192
#: Percentiles of the ground-truth crop mapped to black and white for non-8-bit sources.
WINDOW_PERCENTILES = (1.0, 99.0)
#: Layout (pixels): gap between cells, the label strip above each cell, the set header above each row.
GAP, LABEL_H, HEADER_H, MARGIN = 6, 42, 44, 8
#: Baselines of the two text lines in the set header and in each label strip, from the strip's top.
BASELINES = (17, 35)
FONT, FONT_SCALE, HEADER_SCALE, THICKNESS = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0.55, 1
BACKGROUND, TEXT, HEADER_TEXT, DETAIL_TEXT = (32, 32, 32), (240, 240, 240), (120, 220, 255), (190, 190, 190)
MIN_WINDOW = 1e-6


@dataclass
class Sample:
    """One set's chosen image: ``(H, W, C)`` BGR float ``[0, 1]`` arrays of the (upsampled) input, the ground
    truth and each checkpoint's output, and their PSNRs."""

    set_name: str
    domain: str
    task: str
    image: str
    index: int  # position in the set's loader
    bit_depth: int
    lq: np.ndarray
    gt: np.ndarray
    psnr_in: float
    gain: float  # PSNR gain of the first checkpoint on this image
    outputs: dict = field(default_factory=dict)  # checkpoint label -> array
    psnr_out: dict = field(default_factory=dict)  # checkpoint label -> PSNR


def best_crop(lq: np.ndarray, out: np.ndarray, gt: np.ndarray, size: int = CROP) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the ``size`` window (clipped to the image) where the squared error of
    ``out`` is lowest relative to that of ``lq``, i.e. where the restoration gained most."""
    gain = ((lq - gt) ** 2 - (out - gt) ** 2).mean(axis=2).astype(np.float64)
    h, w = min(size, gain.shape[0]), min(size, gain.shape[1])
    s = cv2.integral(gain)  # (H + 1, W + 1) sums of the top-left rectangles
    sums = s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left), h, w


def _to_uint8(img: np.ndarray, window: Optional[tuple[float, float]]) -> np.ndarray:
    if window is not None:
        img = (img - window[0]) / max(window[1] - window[0], MIN_WINDOW)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _fits(text: str, width: int, scale: float) -> bool:
    return cv2.getTextSize(text, FONT, scale, THICKNESS)[0][0] <= width


def _fit(text: str, width: int, scale: float) -> str:
    """``text``, or its longest end that fits ``width`` pixels behind a '..' (labels differ at their ends)."""
    if _fits(text, width, scale):
        return text
    return next((f'..{text[i:]}' for i in range(1, len(text)) if _fits(f'..{text[i:]}', width, scale)), '')


def _put(canvas: np.ndarray, text: str, x: int, y: int, width: int, scale: float = FONT_SCALE,
         color=TEXT) -> None:
    cv2.putText(canvas, _fit(text, width, scale), (x, y), FONT, scale, color, THICKNESS, cv2.LINE_AA)


def _psnr_text(value: Optional[float], gain: Optional[float] = None) -> str:
    if value is None:
        return 'PSNR n/a'
    return f'{value:.2f} dB' + ('' if gain is None else f' ({gain:+.2f})')


def render(samples: Sequence[Sample], labels: Sequence[str]) -> np.ndarray:
    """The picture as a ``uint8`` BGR array: one row per sample, ``2 + len(labels)`` cells per row."""
    columns = 2 + len(labels)
    width = MARGIN * 2 + columns * CELL + (columns - 1) * GAP
    row_h = HEADER_H + LABEL_H + CELL + GAP
    canvas = np.full((MARGIN * 2 + max(len(samples), 1) * row_h, width, 3), BACKGROUND, np.uint8)
    if not samples:
        _put(canvas, 'no sample: no image had a finite PSNR gain', MARGIN, MARGIN + BASELINES[0], width)
        return canvas
    for r, sample in enumerate(samples):
        y0 = MARGIN + r * row_h
        first = sample.outputs.get(labels[0], sample.lq)
        top, left, h, w = best_crop(sample.lq, first, sample.gt)
        crop = (slice(top, top + h), slice(left, left + w))
        window = None
        if sample.bit_depth != 8:
            window = tuple(float(v) for v in np.percentile(sample.gt[crop], WINDOW_PERCENTILES))
        detail = (f'{sample.image}, crop {w}x{h} at x={left}, y={top}'
                  + (f', {sample.bit_depth}-bit shown p1-p99 of GT' if window else ''))
        _put(canvas, f'{sample.set_name} ({sample.domain}/{sample.task})', MARGIN, y0 + BASELINES[0],
             width - 2 * MARGIN, HEADER_SCALE, HEADER_TEXT)
        _put(canvas, detail, MARGIN, y0 + BASELINES[1], width - 2 * MARGIN, FONT_SCALE, DETAIL_TEXT)
        cells = [('input', sample.lq, _psnr_text(sample.psnr_in))]
        for label in labels:
            value = sample.psnr_out.get(label)
            gain = None if value is None or sample.psnr_in is None else value - sample.psnr_in
            cells.append((label, sample.outputs.get(label), _psnr_text(value, gain)))
        cells.append(('ground truth', sample.gt, 'reference'))
        zoom = max(1, CELL // max(h, w))
        for c, (title, img, subtitle) in enumerate(cells):
            x0 = MARGIN + c * (CELL + GAP)
            _put(canvas, title, x0 + 2, y0 + HEADER_H + BASELINES[0], CELL - 4)
            _put(canvas, subtitle, x0 + 2, y0 + HEADER_H + BASELINES[1], CELL - 4)
            if img is None:
                continue
            tile = cv2.resize(_to_uint8(img[crop], window), (w * zoom, h * zoom), interpolation=cv2.INTER_NEAREST)
            ty, tx = y0 + HEADER_H + LABEL_H + (CELL - tile.shape[0]) // 2, x0 + (CELL - tile.shape[1]) // 2
            canvas[ty:ty + tile.shape[0], tx:tx + tile.shape[1]] = tile
    return canvas


def write_samples(samples: Sequence[Sample], labels: Sequence[str], path: str) -> str:
    """Render the picture (see :func:`render`) and write it as PNG, atomically; returns ``path``."""
    write(path, render(samples, labels))
    return path
