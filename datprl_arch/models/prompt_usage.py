"""Hard prompt-usage statistics over a window of iterations, and re-initialisation of prompts nobody selects.

Not a loss: the training model feeds each step's top-k ``indices`` to a ``PromptUsageTracker``; every
``stats_update_freq`` iterations ``step`` returns the window's counts (summed over distributed ranks) and starts a
new window. With ``reinit_prompts`` the model passes the never-selected rows to ``reinitialise_prompts``.

Under torch.distributed each rank counts its own selections and the window's count is the sum over ranks. For a
training state, ``consolidate`` moves that sum to rank 0 (which saves it), and ``load_state`` gives it back to rank 0
only, so a resumed window counts every earlier selection once.

Why re-draw the init rather than copy the most used prompt plus noise: a copy sits at cosine ≈ 1 from its source, so
the diversity loss immediately pushes it away again and the two compete for the same queries; a fresh row from the
pool's own init distribution is as far from the others as the pool was at the start of training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import distributed as dist
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class PoolUsage:
    """Selections of each prompt of one pool during a window: ``counts`` ``[P]`` (int64, all ranks)."""
    counts: torch.Tensor

    @property
    def selections(self) -> int:
        """Top-k selections in the window (samples × k, all ranks)."""
        return int(self.counts.sum())

    @property
    def fractions(self) -> torch.Tensor:
        """Share of the selections that went to each prompt ``[P]`` (zeros for an empty window)."""
        return self.counts.double() / max(self.selections, 1)

    @property
    def unused(self) -> list[int]:
        """Rows never selected in the window (empty for an empty window: nothing was observed)."""
        return (self.counts == 0).nonzero().flatten().tolist() if self.selections else []

    def summary(self) -> str:
        shares = ', '.join(f'{f:.3f}' for f in self.fractions.tolist())
        return f'{self.selections} selections, shares [{shares}], never selected {self.unused}'


class PromptUsageTracker:
    """Counts how often each prompt of each pool is among a sample's top-k, over windows of ``update_freq`` iterations.

    Args:
        pool_sizes: pool name -> size P, e.g. ``{'task': 15, 'domain': 6}``; every rank must use the same pools.
        update_freq: window length in iterations (``stats_update_freq``; 5000 in the 6T config).
    """

    def __init__(self, pool_sizes: Mapping[str, int], update_freq: int):
        if update_freq < 1:
            raise ValueError(f'stats_update_freq must be a positive number of iterations, got {update_freq}')
        self.pool_sizes = dict(pool_sizes)
        self.update_freq = update_freq
        self.counts: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start a new window: all counters to zero."""
        self.counts = {name: torch.zeros(size, dtype=torch.int64) for name, size in self.pool_sizes.items()}

    def update(self, name: str, indices: torch.Tensor) -> None:
        """Add one step's selections of pool ``name``: ``indices`` ``[B, k]`` (``PoolOutput.indices``).

        Counted on the indices' device without reading anything back (CUDA's ``bincount`` reads its maximum back to
        the CPU every step); the range check runs for CPU indices only."""
        if name not in self.counts:
            raise KeyError(f'unknown prompt pool {name!r}; the tracker counts {sorted(self.counts)}')
        size = self.pool_sizes[name]
        flat = indices.detach().flatten()
        if flat.device.type == 'cpu' and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= size):
            raise ValueError(f'indices of pool {name!r} must lie in [0, {size}), got {int(flat.min())}..'
                             f'{int(flat.max())}')
        counts = self.counts[name].to(flat.device)
        self.counts[name] = counts.index_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))

    def step(self, current_iter: int) -> Optional[dict[str, PoolUsage]]:
        """Call once per iteration after ``update``: at the end of a window (``current_iter % update_freq == 0``)
        returns the window's usage of every pool (reduced across ranks) and resets; otherwise ``None``."""
        if current_iter % self.update_freq:
            return None
        return self.report()

    def report(self) -> dict[str, PoolUsage]:
        """Usage of every pool in the current window, summed over ranks (a collective: all ranks must call it);
        then starts a new window."""
        summed = self._summed()
        self.reset()
        return {name: PoolUsage(counts) for name, counts in summed.items()}

    def consolidate(self) -> None:
        """Collect the window's counts of all ranks on rank 0; the other ranks go on from zeros (a collective: all
        ranks must call it). The sum over ranks, and so every later ``report``, is unchanged; rank 0's ``state`` is
        then the whole window's. Nothing changes without torch.distributed."""
        if not _distributed():
            return
        summed = self._summed()
        self.counts = summed if dist.get_rank() == 0 else {name: torch.zeros_like(c) for name, c in summed.items()}

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's counts of the current window on the CPU, for a training state (after ``consolidate``, rank
        0's are those of all ranks)."""
        return {name: counts.cpu().clone() for name, counts in self.counts.items()}

    def load_state(self, counts: Mapping[str, torch.Tensor]) -> None:
        """Continue a window from the counts of a training state (all ranks' selections, as ``consolidate`` left
        them on rank 0): rank 0 takes them, the other ranks start from zeros, so ``report`` counts them once."""
        rank = dist.get_rank() if _distributed() else 0
        self.reset()
        if rank == 0:
            self.counts.update({name: counts[name].to(torch.int64).clone() for name in self.counts if name in counts})

    def _summed(self) -> dict[str, torch.Tensor]:
        """The window's counts summed over ranks (a collective under torch.distributed), on the CPU."""
        names = list(self.pool_sizes)
        stacked = torch.cat([self.counts[name].cpu() for name in names])
        if _distributed():
            if dist.get_backend() == dist.Backend.NCCL:
                stacked = stacked.cuda()
            dist.all_reduce(stacked)
        return dict(zip(names, stacked.cpu().split([self.pool_sizes[name] for name in names])))


@torch.no_grad()
def reinitialise_prompts(pool: nn.Module, rows: Sequence[int],
                         optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Re-draw the init of prompt ``rows`` of ``pool`` (``PromptPool.reset_prompts``) and clear their optimizer state.

    Per-element optimizer state of ``prompt_keys``/``prompt_values`` (Adam's moments) is zeroed on those rows, so the
    old momentum does not drag the fresh rows back. Under torch.distributed rank 0's new rows are broadcast, keeping
    the replicas identical (every rank must call this with the same ``rows``).
    """
    if not rows:
        return
    rows = torch.as_tensor(list(rows), dtype=torch.int64)
    pool.reset_prompts(rows)
    for param in (pool.prompt_keys, pool.prompt_values):
        if _distributed():
            fresh = param.data[rows.to(param.device)]
            if dist.get_backend() == dist.Backend.NCCL:
                fresh = fresh.cuda()
            dist.broadcast(fresh, src=0)
            param.data[rows.to(param.device)] = fresh.to(param.device)
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[rows.to(value.device)] = 0
