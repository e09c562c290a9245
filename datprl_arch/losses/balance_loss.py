"""Prompt usage balance: a differentiable penalty on uneven (soft) usage of a pool's prompts."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY

from ..utils.registry import register
from .precision import float32

BALANCE_MODES = ('square', 'kl')
#: Floor of the usage inside the KL's logarithm (an unused prompt contributes 0 · log(tiny) = 0).
USAGE_FLOOR = torch.finfo(torch.float32).tiny


def soft_usage(logits: torch.Tensor) -> torch.Tensor:
    """Retrieval logits ``[B, P]`` -> soft usage ``u = mean_b softmax(logits_b)`` ``[P]`` (sums to 1)."""
    if logits.dim() != 2:
        raise ValueError(f'balance loss needs pool logits [B, P], got shape {tuple(logits.shape)}')
    return logits.float().softmax(dim=-1).mean(dim=0)


@register(LOSS_REGISTRY, aliases=('PromptBalanceLoss',))
class DATPRLBalanceLoss(nn.Module):
    """Keep a pool's usage near uniform, from the soft usage ``u = mean_b softmax(s_b)`` over the whole pool.

    ``s`` are the pool's temperature-scaled cosine logits ``[B, P]`` (``PoolOutput.logits``). Per pool:

        mode 'square':  L_bal = P · Σ_i u_i² − 1        (0 at uniform usage, P − 1 when one prompt takes all)
        mode 'kl':      L_bal = KL(u ‖ uniform) = Σ_i u_i log(P · u_i)   (0 at uniform, log P at worst)

    and the loss is ``loss_weight * Σ_pools L_bal``. Computed in float32.

    Args:
        loss_weight: multiplier (``prompt_balance_weight``; 0.1 in the 6T config).
        mode: 'square' (default) or 'kl'.
    """

    def __init__(self, loss_weight: float = 1.0, mode: str = 'square'):
        super().__init__()
        if mode not in BALANCE_MODES:
            raise ValueError(f'balance loss mode must be one of {BALANCE_MODES}, got {mode!r}')
        self.loss_weight = loss_weight
        self.mode = mode

    def pool_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """L_bal of one pool from its logits ``[B, P]`` (unweighted)."""
        usage = soft_usage(logits)
        pool_size = usage.numel()
        if self.mode == 'square':
            return pool_size * usage.square().sum() - 1
        return (usage * (pool_size * usage.clamp_min(USAGE_FLOOR)).log()).sum()

    def forward(self, *pools: Union[torch.Tensor, tuple]) -> torch.Tensor:
        """One or more pools, each a ``PoolOutput`` (its ``logits`` are used) or logits ``[B, P]`` -> scalar."""
        if not pools:
            raise ValueError('DATPRLBalanceLoss needs the logits of at least one pool')
        logits = [getattr(pool, 'logits', pool) for pool in pools]
        with float32(logits[0].device):
            return self.loss_weight * sum(self.pool_loss(x) for x in logits)
