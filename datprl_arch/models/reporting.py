"""Validation/test reporting over many sets: per-set metrics, the average over all sets and per domain, written to
the log and to a JSON file (``metrics.json`` in the experiment or results folder), and result images written back
in the input's bit depth and channels.

A set that holds several sources (two domains or tasks in one validation set) is reported per source: each source
is an entry ``<set>/<source>`` under its own domain and task, in the log, in ``metrics.json`` and in the averages
(one label for the whole set would file CT images under a natural-image task)."""
from __future__ import annotations

import json
import os
from collections import OrderedDict, defaultdict
from typing import NamedTuple, Optional

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


class SourceLabel(NamedTuple):
    """Where an image of a validation set comes from: its source (None for datasets without sources), domain, task."""
    source: Optional[str]
    domain: str
    task: str


class SetScores:
    """Metric values of one validation/test set, per source: the whole set's means and one entry per source.

    Args:
        set_name: the set's ``name``.
        dataset_opt: the set's options; its ``domain`` / ``task`` (datasets without sources) label every image.
    """

    def __init__(self, set_name: str, dataset_opt: dict):
        self.set_name = set_name
        self.domain, self.task = dataset_opt.get('domain'), dataset_opt.get('task')
        self.values: 'OrderedDict[SourceLabel, dict]' = OrderedDict()

    def label(self, batch: dict) -> SourceLabel:
        """The source, domain and task of a batch of one image (the dataset's labels, else the set's)."""
        def first(key):
            return str(batch[key][0]) if key in batch else None
        return SourceLabel(first('source_name'), self.domain or first('domain_name') or 'all',
                           self.task or first('task_name') or self.set_name)

    def add(self, label: SourceLabel, values: dict) -> None:
        """One image's metric values (None: the metric is undefined for it and left out of the means)."""
        per_metric = self.values.setdefault(label, defaultdict(list))
        for name, value in values.items():
            if value is not None:
                per_metric[name].append(value)

    @property
    def mixed(self) -> bool:
        return len(self.values) > 1

    def means(self) -> dict:
        """Per metric, the mean over every image of the set."""
        merged = defaultdict(list)
        for per_metric in self.values.values():
            for name, values in per_metric.items():
                merged[name] += values
        return {name: float(np.mean(values)) for name, values in merged.items() if values}

    def entries(self) -> list[tuple[str, str, str, dict]]:
        """``(entry name, domain, task, means)`` per source: the set's name for a set of one source, else
        ``<set>/<source>``."""
        return [(f'{self.set_name}/{label.source}' if self.mixed else self.set_name, label.domain, label.task,
                 {name: float(np.mean(v)) for name, v in per_metric.items() if v})
                for label, per_metric in self.values.items()]


def _format(values: dict) -> str:
    return '  '.join(f'{k}: {v:.4f}' for k, v in values.items())


def source_lines(scores: SetScores) -> list[str]:
    """Log lines of a mixed set's sources (none for a set of one source)."""
    if not scores.mixed:
        return []
    return [f'  {name} ({domain}, {task}): {_format(means)}' for name, domain, task, means in scores.entries()]


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
        """Record one set of one source (with its domain and task); returns the round summary (a log message) when
        it was the round's last set."""
        return self.add_set(current_iter, set_name, [(set_name, domain, task or set_name, metrics)])

    def add_set(self, current_iter, set_name: str, entries: list[tuple[str, str, str, dict]]) -> Optional[str]:
        """Record one set as ``(entry name, domain, task, metrics)`` entries (one per source:
        :meth:`SetScores.entries`); returns the round summary when it was the round's last set."""
        self.pending[set_name] = entries
        if len(self.pending) < self.num_sets:
            return None
        sets = OrderedDict((name, {'domain': domain, 'task': task, **metrics})
                           for entries in self.pending.values() for name, domain, task, metrics in entries)
        self.pending = OrderedDict()
        rows = [{k: v for k, v in r.items() if k not in ('domain', 'task')} for r in sets.values()]
        by_domain = defaultdict(list)
        for row, record in zip(rows, sets.values()):
            by_domain[record['domain']].append(row)
        self.last_average = _mean(rows)
        domains = {d: _mean(r) for d, r in by_domain.items()}
        self.rounds[str(current_iter)] = {'sets': sets, 'average': self.last_average, 'domains': domains}
        atomic_write_json(self.rounds, self.json_path)

        lines = [f'Validation average over {len(rows)} sets: {_format(self.last_average)}']
        lines += [f'  domain {d} ({len(by_domain[d])} sets): {_format(v)}' for d, v in domains.items()]
        return '\n'.join(lines)
