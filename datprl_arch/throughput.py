"""Loader throughput on MD-Mini: samples/s of BasicSR's own training loader over our dataset, disk PNG vs LMDB.

    python -m datprl_arch.throughput [--root datasets/md_mini] [--batches 30]

Each row runs BasicSR's ``EnlargedSampler`` + ``build_dataloader`` with the MD-Mini training sources (balanced
batches, ``gt_size`` crops, LQ synthesised per crop) and times ``batches`` batches after one warm-up batch (worker
start-up excluded), best of :data:`REPEATS` rounds. ``python -m datprl_arch.bench --data`` prints the same table.
"""
from __future__ import annotations

import argparse
import copy
import gc
import logging
import os.path as osp
import sys
import time
from typing import Optional, Sequence

import yaml

#: Crop side of the measurement (the paper's training crop).
GT_SIZE = 128
WORKERS = (0, 1, 2)
#: Timed rounds per row; the fastest is reported (the machine is shared, slower rounds measure interference).
REPEATS = 3
BACKENDS = ('disk', 'lmdb')


def train_options(root: str, backend: str, workers: int, gt_size: int = GT_SIZE) -> dict:
    """The MD-Mini training dataset options with every source switched to ``backend``."""
    with open(osp.join(root, 'options_train.yml')) as f:
        opt = copy.deepcopy(yaml.safe_load(f)['datasets']['train'])
    for src in opt['datasets']:
        for side in (k for k in ('dataroot_gt', 'dataroot_lq') if k in src):  # synth sources have GT only
            base = src[side][:-len('.lmdb')] if src[side].endswith('.lmdb') else src[side]
            src[side] = base + ('.lmdb' if backend == 'lmdb' else '')
        src['io_backend'] = {'type': backend}
    opt.update(phase='train', gt_size=gt_size, num_worker_per_gpu=workers, sampling_seed=0,
               persistent_workers=False)
    return opt


def measure(root: str, workers: Sequence[int] = WORKERS, backends: Sequence[str] = BACKENDS, batches: int = 30,
            gt_size: int = GT_SIZE) -> list[dict]:
    """One row per (backend, workers): ``{'backend', 'workers', 'batch_size', 'samples_per_s'}``."""
    from basicsr.data import build_dataloader, build_dataset
    from basicsr.data.data_sampler import EnlargedSampler

    rows = []
    for backend in backends:
        for num_workers in workers:
            opt = train_options(root, backend, num_workers, gt_size)
            dataset = build_dataset(opt)
            ratio = max(1, (REPEATS * batches + 1) * opt['batch_size_per_gpu'] // len(dataset) + 1)
            loader = build_dataloader(dataset, opt, num_gpu=0, dist=False,
                                      sampler=EnlargedSampler(dataset, 1, 0, ratio), seed=0)
            iterator = iter(loader)
            next(iterator)
            times = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                for _ in range(batches):
                    next(iterator)
                times.append(time.perf_counter() - start)
            elapsed = min(times)
            del iterator, loader, dataset  # release LMDB handles before the next row opens them again
            gc.collect()
            rows.append({'backend': backend, 'workers': num_workers, 'batch_size': opt['batch_size_per_gpu'],
                         'samples_per_s': batches * opt['batch_size_per_gpu'] / elapsed})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of :func:`measure` rows plus the LMDB / disk speed-up per worker count."""
    by = {(r['backend'], r['workers']): r['samples_per_s'] for r in rows}
    lines = ['| workers | disk PNG (samples/s) | LMDB (samples/s) | LMDB / disk |', '|---|---|---|---|']
    for w in sorted({r['workers'] for r in rows}):
        disk, lmdb = by.get(('disk', w)), by.get(('lmdb', w))
        ratio = f'{lmdb / disk:.2f}x' if disk and lmdb else '-'
        lines.append(f'| {w} | {disk:.0f} | {lmdb:.0f} | {ratio} |' if disk and lmdb else f'| {w} | - | - | - |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basicsr.utils import get_root_logger

    from .mdmini import DEFAULT_OUT, build

    parser = argparse.ArgumentParser(prog='python -m datprl_arch.throughput', description=__doc__.split('\n\n')[0])
    parser.add_argument('--root', default=DEFAULT_OUT, help='MD-Mini folder (built if missing)')
    parser.add_argument('--batches', type=int, default=30, help='timed batches per row')
    args = parser.parse_args(argv)
    get_root_logger().setLevel(logging.WARNING)
    build(args.root)
    sys.stdout.write(table(measure(args.root, batches=args.batches)) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
