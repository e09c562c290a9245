"""Tiny synthetic paired folders for the tests (smooth random images, LQ = noisy / downscaled GT)."""
from __future__ import annotations

import os
import os.path as osp

import cv2
import numpy as np

from datprl_arch.data.image_io import DTYPE_RANGE


def random_image(rng: np.random.Generator, h: int, w: int, channels: int, bit_depth: int) -> np.ndarray:
    """A smooth random ``uint8``/``uint16`` image ``(H, W)`` or ``(H, W, 3)`` (low-frequency noise, full range)."""
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    coarse = rng.random((max(2, h // 8), max(2, w // 8), channels)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, channels)
    img = np.clip(img * DTYPE_RANGE[np.dtype(dtype)], 0, DTYPE_RANGE[np.dtype(dtype)]).round().astype(dtype)
    return img[..., 0] if channels == 1 else img


def write_pairs(root: str, count: int = 4, size: tuple[int, int] = (48, 64), scale: int = 1, bit_depth: int = 8,
                channels: int = 3, ext: str = '.png', seed: int = 0, lq_tmpl: str = '{}') -> tuple[str, str]:
    """Write ``count`` GT/LQ pairs under ``root/gt`` and ``root/lq``; returns the two folders.

    GT is ``size`` (H, W); LQ is GT downscaled by ``scale`` (area) plus mild noise, saved as ``lq_tmpl.format(stem)``.
    """
    rng = np.random.default_rng(seed)
    gt_dir, lq_dir = osp.join(root, 'gt'), osp.join(root, 'lq')
    os.makedirs(gt_dir, exist_ok=True)
    os.makedirs(lq_dir, exist_ok=True)
    for i in range(count):
        gt = random_image(rng, size[0], size[1], channels, bit_depth)
        lq = cv2.resize(gt, (size[1] // scale, size[0] // scale), interpolation=cv2.INTER_AREA) if scale > 1 else gt
        noise = rng.integers(-3, 4, lq.shape) * (1 if bit_depth == 8 else 257)
        lq = np.clip(lq.astype(np.int64) + noise, 0, np.iinfo(gt.dtype).max).astype(gt.dtype)
        stem = f'img{i:03d}'
        cv2.imwrite(osp.join(gt_dir, stem + ext), gt)
        cv2.imwrite(osp.join(lq_dir, lq_tmpl.format(stem) + ext), lq)
    return gt_dir, lq_dir
