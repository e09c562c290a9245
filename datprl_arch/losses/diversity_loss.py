"""Prompt diversity: keep the prompts of a pool apart, so the pool does not collapse onto a few directions."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import LOSS_REGISTRY

from ..utils.registry import register
from .precision import float32

#: A pool, or its ``(keys [P, D], values [P, T, D])`` tensors.
PoolLike = Union[nn.Module, tuple]


def off_diagonal_cosine(rows: torch.Tensor) -> torch.Tensor:
    """rows ``[P, F]`` -> cosine similarity ``[P, P]`` of every pair of rows, with the diagonal set to 0."""
    unit = F.normalize(rows.float(), dim=-1)
    similarity = unit @ unit.t()
    return similarity.masked_fill(torch.eye(len(rows), dtype=torch.bool, device=rows.device), 0.0)


def pool_tensors(pool: PoolLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys [P, D], values [P, ...])`` of a ``PromptPool`` (anything with ``prompt_keys``/``prompt_values``)
    or of a ``(keys, values)`` pair."""
    if hasattr(pool, 'prompt_keys') and hasattr(pool, 'prompt_values'):
        return pool.prompt_keys, pool.prompt_values
    if isinstance(pool, (tuple, list)) and len(pool) == 2 and all(torch.is_tensor(t) for t in pool):
        keys, values = pool
        if keys.dim() != 2 or len(values) != len(keys):
            raise ValueError(f'pool keys must be [P, D] and values [P, ...] with the same P, got '
                             f'{tuple(keys.shape)} and {tuple(values.shape)}')
        return keys, values
    raise TypeError(f'expected a PromptPool or a (keys, values) tensor pair, got {type(pool).__name__}')


@register(LOSS_REGISTRY, aliases=('PromptDiversityLoss',))
class DATPRLDiversityLoss(nn.Module):
    """Penalise prompt pairs of a pool whose keys or values are more similar than a threshold.

    Per pool, with ``S_K`` the ``[P, P]`` cosine similarities of the keys ``[P, D]`` and ``S_V`` those of the values
    flattened to ``[P, T*D]``, both with the diagonal set to 0 (the mean divides by P², not P(P-1)):

        L_div = ½ [ mean(ReLU(S_V - τ_d)) + mean(ReLU(S_K - τ_d)) ]

    and the loss is ``loss_weight * Σ_pools L_div``. Gradients reach keys and values; computed in float32.

    Args:
        loss_weight: multiplier (the option ``prompt_diversity_weight``; 1.0 in the 6T config).
        threshold: τ_d, similarity above which pairs are penalised (``diversity_temperature``; 0.1 in 6T).
    """

    def __init__(self, loss_weight: float = 1.0, threshold: float = 0.1):
        super().__init__()
        self.loss_weight = loss_weight
        self.threshold = threshold

    def pool_loss(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """L_div of one pool: keys ``[P, D]``, values ``[P, ...]`` -> scalar (unweighted)."""
        key_term = (off_diagonal_cosine(keys) - self.threshold).relu().mean()
        value_term = (off_diagonal_cosine(values.flatten(1)) - self.threshold).relu().mean()
        return 0.5 * (value_term + key_term)

    def forward(self, *pools: PoolLike) -> torch.Tensor:
        """One or more pools (``PromptPool`` or ``(keys, values)``) -> scalar, summed over the pools."""
        if not pools:
            raise ValueError('DATPRLDiversityLoss needs at least one prompt pool')
        tensors = [pool_tensors(pool) for pool in pools]
        with float32(tensors[0][0].device):
            return self.loss_weight * sum(self.pool_loss(keys, values) for keys, values in tensors)
