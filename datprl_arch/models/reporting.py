"""Validation/test reporting over many sets: per-set metrics, the average over all sets and per domain, written to
the log and to a JSON file (``metrics.json`` in the experiment or results folder), and result images written back
in the input's bit depth and channels."""
from __future__ import annotations

import json
import os
from collections import OrderedDict, defaultdict
from typing import Optional

import numpy as np
import torch

from ..data.image_io import ImageFormat, tensor_to_stored, write
from ..utils.atomic import atomic_write_json


def write_result_image(path: str, result: torch.Tensor, batch: dict) -> None:
    """Write a ``[C, H, W]`` RGB result in ``[0, 1]`` in the stored format of the batch's first LQ image (8-bit of
    the result's channels when the dataset does not report one)."""
    if 'bit_depth' in batch:
        fmt = ImageFormat(int(batch['bit_depth'][0]), int(batch['channels'][0]))
    else:
        fmt = ImageFormat(8, result.shape[0])
    write(path, tensor_to_stored(result.clamp(0, 1), fmt))


def _mean(rows: list[dict]) -> dict:
    """Per metric, the mean over the rows that have it (a set can lack a metric no image of it had, e.g. SSIM of
    images under 11 px)."""
    names = dict.fromkeys(name for row in rows for name in row)
    means = {name: [row[name] for row in rows if row.get(name) is not None] for name in names}
    return {name: float(np.mean(values)) for name, values in means.items() if values}


class ValidationReport:
    """Collects the sets of one validation round; once all ``num_sets`` have reported, summarises the round.

    Args:
        num_sets: validation (training) or test sets per round, counted from the option file.
        json_path: where every round is recorded, keyed by iteration (or test name).
    """

    def __init__(self, num_sets: int, json_path: str, resume: bool = False):
        self.num_sets, self.json_path = num_sets, json_path
        self.rounds: 'OrderedDict[str, dict]' = OrderedDict()
        if resume and os.path.isfile(json_path):  # a resumed run keeps the rounds recorded before it
            with open(json_path, encoding='utf-8') as f:
                self.rounds.update(json.load(f, object_pairs_hook=OrderedDict))
        self.pending: dict = OrderedDict()
        self.last_average: dict = {}

    def add(self, current_iter, set_name: str, domain: str, metrics: dict, task: Optional[str] = None) -> Optional[str]:
        """Record one set (with its domain and task); returns the round summary (a log message) when it was the
        round's last set."""
        self.pending[set_name] = {'domain': domain, 'task': task or set_name, **metrics}
        if len(self.pending) < self.num_sets:
            return None
        sets, self.pending = self.pending, OrderedDict()
        rows = [{k: v for k, v in r.items() if k not in ('domain', 'task')} for r in sets.values()]
        by_domain = defaultdict(list)
        for row, record in zip(rows, sets.values()):
            by_domain[record['domain']].append(row)
        self.last_average = _mean(rows)
        domains = {d: _mean(r) for d, r in by_domain.items()}
        self.rounds[str(current_iter)] = {'sets': sets, 'average': self.last_average, 'domains': domains}
        atomic_write_json(self.rounds, self.json_path)

        def fmt(values):
            return '  '.join(f'{k}: {v:.4f}' for k, v in values.items())

        lines = [f'Validation average over {len(rows)} sets: {fmt(self.last_average)}']
        lines += [f'  domain {d} ({len(by_domain[d])} sets): {fmt(v)}' for d, v in domains.items()]
        return '\n'.join(lines)
