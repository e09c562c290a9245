"""Tiny denoising pairs for the smoke demo, cut from photos that scikit-image ships (no download).

    python scripts/make_smoke_data.py [--out build/smoke] [--size 64] [--sigma 25] [--seed 0]

Writes ``OUT/{train,val}/{gt,lq}/*.png``: GT blocks of ``size`` pixels, LQ = GT + Gaussian noise of std ``sigma``
(on the 0-255 scale). Train blocks come from astronaut, coffee and chelsea; val blocks from rocket, so no val pixel is
seen in training. The folder is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import os.path as osp
import shutil

import cv2
import numpy as np

SPLITS = {'train': ('astronaut.png', 'coffee.png', 'chelsea.png'), 'val': ('rocket.jpg',)}
BLOCKS_PER_IMAGE = {'train': 4, 'val': 2}


def skimage_data_dir() -> str:
    spec = importlib.util.find_spec('skimage')
    if spec is None:
        raise SystemExit('make_smoke_data: scikit-image is not installed; install the demo extra '
                         '(pip install --no-build-isolation -e .[demo]).')
    return osp.join(spec.submodule_search_locations[0], 'data')


def blocks(img: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` non-overlapping ``size`` x ``size`` blocks along the diagonal of the central square of ``img``."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    step = side // count
    if step < size:
        raise SystemExit(f'make_smoke_data: --size {size} is too large for a {h}x{w} image and {count} blocks.')
    return [img[top + i * step:top + i * step + size, left + i * step:left + i * step + size] for i in range(count)]


def write(out: str, size: int, sigma: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = skimage_data_dir()
    tmp = out + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, names in SPLITS.items():
        for sub in ('gt', 'lq'):
            os.makedirs(osp.join(tmp, split, sub))
        for name in names:
            img = cv2.imread(osp.join(src, name), cv2.IMREAD_COLOR)
            if img is None:
                raise SystemExit(f'make_smoke_data: cannot read {osp.join(src, name)}.')
            for i, gt in enumerate(blocks(img, size, BLOCKS_PER_IMAGE[split])):
                lq = np.clip(gt + rng.normal(0.0, sigma, gt.shape), 0, 255).round().astype(np.uint8)
                stem = f'{osp.splitext(name)[0]}_{i}.png'
                cv2.imwrite(osp.join(tmp, split, 'gt', stem), gt)
                cv2.imwrite(osp.join(tmp, split, 'lq', stem), lq)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='build/smoke')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--sigma', type=float, default=25.0)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.size, args.sigma, args.seed)


if __name__ == '__main__':
    main()
