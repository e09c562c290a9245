"""Balanced multi-source sampling that works under BasicSR's own sampler and DataLoader.

BasicSR's ``train_pipeline`` always builds ``EnlargedSampler`` (a per-epoch permutation of
``len(dataset) * dataset_enlarge_ratio`` indices, sharded by rank) and a plain ``DataLoader`` with
``batch_size=batch_size_per_gpu, drop_last=True``. We cannot swap in a batch sampler without changing BasicSR, so the
dataset itself turns the indices it receives into ``(source, item)`` draws:

* **Whole batches.** With automatic batching, PyTorch's fetcher hands a dataset that defines ``__getitems__`` the full
  index list of one batch. :meth:`BalancedSchedule.draw_batch` allocates the batch's slots to sources by stratified
  (systematic) sampling: source ``j`` with normalised weight ``p_j`` gets ``floor(B p_j)`` slots plus one more with
  probability equal to the fractional part, so every batch holds each source ``floor`` or ``ceil`` of its share and the
  expected share is exactly ``p_j``. With equal weights and ``B >= N`` every source is in every batch; with ``B < N``
  a batch holds ``B`` distinct sources.
* **Determinism.** The allocation RNG is seeded by ``(seed, rank, batch indices)``. The indices are fixed by the
  sampler's epoch-seeded permutation, so a run is reproducible for a seed, differs between epochs (new permutation)
  and between ranks (disjoint index shards, and the rank enters the seed).
* **Items.** Slot ``k`` with sampler index ``i`` drawn for source ``j`` reads item ``perm_j[i mod n_j]`` (``perm_j`` a
  seeded permutation of the source's images): every image is visited about equally often whatever the weights.
* **Single indices** (``dataset[i]``, e.g. a DataLoader with ``batch_size=None``) map through weighted blocks of
  the index range, so uniform indices still give each source its share in expectation.
* ``dataset_enlarge_ratio`` only lengthens the epoch; ``augment_factor`` sets the epoch length per source as in the
  official code (``len(dataset) = sum(n_j * augment_factor_j)``) and, with ``sampling: concat``, reproduces the
  official (unbalanced) concatenation where source shares follow ``n_j * augment_factor_j``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: Sampling policies: balanced by weight (default) or the official concatenation.
SAMPLING_MODES = ('balanced', 'concat')


def allocate(batch_size: int, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Source id for each of ``batch_size`` slots, stratified by ``probs`` (sums to 1); returns ``(batch_size,)``."""
    expected = batch_size * probs
    counts = np.floor(expected).astype(np.int64)
    remainder = batch_size - int(counts.sum())
    if remainder > 0:
        order = rng.permutation(len(probs))
        edges = np.cumsum((expected - counts)[order])
        points = rng.random() + np.arange(remainder)
        picked = order[np.minimum(np.searchsorted(edges, points, side='right'), len(probs) - 1)]
        counts += np.bincount(picked, minlength=len(probs))
    slots = np.repeat(np.arange(len(probs)), counts)
    rng.shuffle(slots)
    return slots


class BalancedSchedule:
    """Maps sampler indices to ``(source, item)`` pairs; see the module docstring for the design.

    Args:
        sizes: number of images of each source ``n_j``.
        weights: relative sampling weight of each source (balanced mode).
        augment_factors: per-source repeat factor; the index range is ``sum(n_j * augment_factor_j)`` long.
        seed: sampling seed (item permutations and batch allocations).
        rank: distributed rank, mixed into every batch seed.
        mode: ``'balanced'`` or ``'concat'``.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], augment_factors: Sequence[int], seed: int,
                 rank: int = 0, mode: str = 'balanced'):
        if mode not in SAMPLING_MODES:
            raise ValueError(f'sampling must be one of {SAMPLING_MODES}, got {mode!r}.')
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.mode, self.seed, self.rank = mode, int(seed), int(rank)
        spans = self.sizes * np.asarray(augment_factors, dtype=np.int64)
        self.length = int(spans.sum())
        if mode == 'balanced':
            weights = np.asarray(weights, dtype=np.float64)
            self.probs = weights / weights.sum()
        else:
            self.probs = spans / spans.sum()
        self.ends = np.round(np.cumsum(self.probs) * self.length).astype(np.int64)
        self.ends[-1] = self.length
        rng = np.random.default_rng([self.seed, len(self.sizes)])
        self.perms = [rng.permutation(n) if mode == 'balanced' else np.arange(n) for n in self.sizes]

    def __len__(self) -> int:
        return self.length

    def _item(self, source: int, index: int) -> int:
        return int(self.perms[source][index % self.sizes[source]])

    def draw(self, index: int) -> tuple[int, int]:
        """``(source, item)`` for one index: the weighted block it falls in, and a position inside that source."""
        if not 0 <= index < self.length:
            raise IndexError(f'index {index} out of range for a schedule of length {self.length}.')
        source = int(np.searchsorted(self.ends, index, side='right'))
        start = 0 if source == 0 else int(self.ends[source - 1])
        return source, self._item(source, index - start if self.mode == 'concat' else index)

    def draw_batch(self, indices: Sequence[int], active: Optional[np.ndarray] = None) -> list[tuple[int, int]]:
        """``(source, item)`` per index of one batch, with stratified source allocation (balanced mode); ``active``
        (a bool per source) restricts the allocation to those sources, their weights renormalised (training
        stages)."""
        if self.mode == 'concat':
            return [self.draw(int(i)) for i in indices]
        rng = np.random.default_rng([self.seed, self.rank, *(int(i) for i in indices)])
        probs = self.probs
        if active is not None and not active.all():
            probs = np.where(active, probs, 0.0)
            probs = probs / probs.sum()
        sources = allocate(len(indices), probs, rng)
        return [(int(s), self._item(int(s), int(i))) for s, i in zip(sources, indices)]
