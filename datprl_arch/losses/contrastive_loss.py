"""Supervised contrastive loss (SupCon) on prompt queries: samples of one label attract, others repel."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import LOSS_REGISTRY

from ..utils.registry import register
from .precision import float32


@register(LOSS_REGISTRY, aliases=('PromptContrastiveLoss',))
class DATPRLSupConLoss(nn.Module):
    """SupCon (Khosla et al. 2020, the "L_out" form) on L2-normalised features ``z`` ``[B, F]`` with labels ``[B]``.

    With ``s_ij = z_i·z_j / τ``, ``A(i)`` every other sample and ``P(i)`` the other samples with ``i``'s label:

        L_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(s_ip) / Σ_{a∈A(i)} exp(s_ia) )
        L   = loss_weight · mean of L_i over the anchors with |P(i)| > 0

    Anchors without a positive in the batch are left out (they still act as negatives). When no sample has a
    positive the loss is 0, still connected to the graph. Use it on the task query (or task prompt) with task or
    source labels, and on the domain query with domain labels. Computed in float32.

    Args:
        loss_weight: multiplier (``prompt_contrastive_weight``; 0.1 in the 6T config).
        temperature: τ.
    """

    def __init__(self, loss_weight: float = 1.0, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'contrastive temperature must be positive, got {temperature}')
        self.loss_weight = loss_weight
        self.temperature = temperature

    def forward(self, features: torch.Tensor, labels: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        """features ``[B, F]``, labels ``[B]`` (int) -> scalar."""
        labels = torch.as_tensor(labels, device=features.device)
        if features.dim() != 2 or labels.shape != features.shape[:1]:
            raise ValueError(f'contrastive loss needs features [B, F] and labels [B], got {tuple(features.shape)} '
                             f'and {tuple(labels.shape)}')
        with float32(features.device):
            unit = F.normalize(features.float(), dim=-1)
            self_pair = torch.eye(len(unit), dtype=torch.bool, device=unit.device)
            logits = (unit @ unit.t() / self.temperature).masked_fill(self_pair, float('-inf'))
            if len(unit) < 2:  # a shape test, not a value test: no GPU-to-CPU synchronisation
                return unit.sum() * 0.0
            positive = (labels[:, None] == labels[None, :]) & ~self_pair
            num_positives = positive.sum(dim=1)
            anchors = (num_positives > 0).float()  # a mask, not an index: the mean stays on the device
            log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
            positive_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
            per_anchor = -positive_log_prob / num_positives.clamp_min(1) * anchors
            return self.loss_weight * per_anchor.sum() / anchors.sum().clamp_min(1)
