"""Shared test setup. ``datprl_arch`` is imported before anything else: its compatibility fixes must precede the first
basicsr import (``import basicsr`` fails on torchvision >= 0.17 without them), and it registers the plugin."""
import os

import cv2
import numpy as np
import pytest

import datprl_arch  # noqa: F401  (first: compatibility fixes, then registration)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests in subprocesses (make test-fast: -m "not slow")')


def write_png_pairs(root: str, count: int = 4, size: int = 32, seed: int = 0) -> tuple[str, str]:
    """``count`` smooth random uint8 BGR images ``size`` x ``size`` in ``root/gt``, noisy copies in ``root/lq``."""
    rng = np.random.default_rng(seed)
    gt_dir, lq_dir = os.path.join(root, 'gt'), os.path.join(root, 'lq')
    os.makedirs(gt_dir)
    os.makedirs(lq_dir)
    for i in range(count):
        coarse = rng.random((size // 8, size // 8, 3)).astype(np.float32)
        gt = (cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR) * 255).round().astype(np.uint8)
        lq = np.clip(gt.astype(np.int16) + rng.integers(-12, 13, gt.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(gt_dir, f'img{i:02d}.png'), gt)
        cv2.imwrite(os.path.join(lq_dir, f'img{i:02d}.png'), lq)
    return gt_dir, lq_dir


@pytest.fixture
def png_pairs(tmp_path):
    """Folders ``(gt, lq)`` with four 32x32 PNG pairs of the same names."""
    return write_png_pairs(str(tmp_path / 'pairs'))
