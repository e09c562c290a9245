"""Statistics of a benchmark: per set from per-image scores, then per task, per domain and overall from the sets.

Per set (one source of a test dataset, one checkpoint): the mean PSNR/SSIM of the degraded input and of the restored
output over its images, the mean gain (output - input, image by image), the sample standard deviation over images
(``ddof=1``) and the 95 % confidence interval of the mean gain (Student t, :data:`T_975`). An image whose metric is
None (see :func:`datprl_arch.evaluation.metrics.score`) is left out of that metric's statistics.

Per task, per domain and overall: the mean of the sets' means (every set weighs the same, as all-in-one papers
average over tasks), with the number of sets and images.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

#: The task of clean sources (the input is the ground truth): their sets have no gain, only the output's PSNR
#: against the input; reports, model cards and learning curves tell them apart by it.
CLEAN_TASK = 'clean'

#: Metrics a benchmark reports, each scored on the input and on the output.
METRICS = ('psnr', 'ssim')
#: Upper 97.5 % quantiles of Student's t by degrees of freedom (two-sided 95 % intervals). Between entries the
#: next smaller tabulated df is used (a slightly wider, conservative interval); beyond the last, the normal 1.96.
T_975 = OrderedDict([
    (1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (7, 2.365), (8, 2.306), (9, 2.262),
    (10, 2.228), (11, 2.201), (12, 2.179), (13, 2.160), (14, 2.145), (15, 2.131), (16, 2.120), (17, 2.110),
    (18, 2.101), (19, 2.093), (20, 2.086), (21, 2.080), (22, 2.074), (23, 2.069), (24, 2.064), (25, 2.060),
    (26, 2.056), (27, 2.052), (28, 2.048), (29, 2.045), (30, 2.042), (40, 2.021), (50, 2.009), (60, 2.000),
    (80, 1.990), (100, 1.984), (120, 1.980), (200, 1.972), (500, 1.965), (1000, 1.962)])
NORMAL_975 = 1.960
#: Levels of the aggregates, after the per-set rows.
LEVELS = ('task', 'domain', 'overall')
#: Fields of a set row averaged over sets in the aggregates.
AVERAGED = tuple(f'{m}_{k}' for m in METRICS for k in ('in', 'out')) + tuple(f'gain_{m}' for m in METRICS)


def t_quantile_975(df: int) -> float:
    """Student t 97.5 % quantile for ``df`` >= 1 degrees of freedom, from :data:`T_975`."""
    if df < 1:
        raise ValueError(f'degrees of freedom must be >= 1, got {df}')
    usable = [k for k in T_975 if k <= df]
    return T_975[usable[-1]] if df <= max(T_975) else NORMAL_975


def mean_std_ci(values: Sequence[float]) -> tuple[Optional[float], Optional[float], Optional[list]]:
    """Mean, sample standard deviation and 95 % t interval ``[low, high]`` of the mean of ``values``; std and
    interval are None for fewer than two values, everything is None for none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None, None, None
    mean = float(values.mean())
    if values.size < 2:
        return mean, None, None
    std = float(values.std(ddof=1))
    half = t_quantile_975(values.size - 1) * std / math.sqrt(values.size)
    return mean, std, [mean - half, mean + half]


def summarize_set(scores: Sequence[dict]) -> dict:
    """Statistics of one set from its per-image scores (dicts with ``psnr_in``, ``psnr_out``, ``ssim_in``,
    ``ssim_out``, each a float or None): ``n_images``; per metric ``n_<m>``, ``<m>_in``, ``<m>_out``,
    ``gain_<m>``, ``<m>_std`` (output over images), ``<m>_in_std``, ``gain_<m>_std``, ``gain_<m>_ci95``."""
    row = {'n_images': len(scores)}
    for m in METRICS:
        kept = [s for s in scores if s.get(f'{m}_in') is not None and s.get(f'{m}_out') is not None]
        gains = [s[f'{m}_out'] - s[f'{m}_in'] for s in kept]
        # both sides over the same images, so that gain = out - in; a set of clean inputs (infinite input PSNR
        # everywhere) has no gain, but its restored images are still scored
        scored = kept or [s for s in scores if s.get(f'{m}_out') is not None]
        mean_in, std_in, _ = mean_std_ci([s[f'{m}_in'] for s in kept])
        mean_out, std_out, _ = mean_std_ci([s[f'{m}_out'] for s in scored])
        gain, gain_std, gain_ci = mean_std_ci(gains)
        row.update({f'n_{m}': len(kept), f'{m}_in': mean_in, f'{m}_out': mean_out, f'gain_{m}': gain,
                    f'{m}_std': std_out, f'{m}_in_std': std_in, f'gain_{m}_std': gain_std,
                    f'gain_{m}_ci95': gain_ci})
    return row


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregate(rows: Sequence[dict], level: str) -> list[dict]:
    """Means over the set ``rows`` (each with ``checkpoint``, ``task``, ``domain`` and the :data:`AVERAGED`
    fields) grouped by checkpoint and by ``level`` (``task``, ``domain`` or ``overall``), in order of appearance."""
    if level not in LEVELS:
        raise ValueError(f'level must be one of {LEVELS}, got {level!r}')
    groups: 'OrderedDict[tuple, list]' = OrderedDict()
    for row in rows:
        key = (row['checkpoint'], 'all' if level == 'overall' else row[level])
        groups.setdefault(key, []).append(row)
    out = []
    for (checkpoint, group), members in groups.items():
        agg = {'level': level, 'group': group, 'checkpoint': checkpoint, 'n_sets': len(members),
               'n_images': sum(r['n_images'] for r in members)}
        agg.update({field: _mean([r[field] for r in members]) for field in AVERAGED})
        out.append(agg)
    return out


def aggregates(rows: Sequence[dict]) -> dict:
    """:func:`aggregate` at every level of :data:`LEVELS`: ``{'task': [...], 'domain': [...], 'overall': [...]}``."""
    return {level: aggregate(rows, level) for level in LEVELS}
