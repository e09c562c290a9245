"""Domain-prior alignment: pull each sample's domain representation towards the text embedding of its description.

The paper distils domain priors from a multimodal LLM: an MLLM describes each training image, a frozen text encoder
(CLIP RN50's, width 1024) embeds the description (``python -m datprl_arch.tools.encode_descriptions``), and the
composed domain prompt is aligned with that embedding. When the prompt width D differs from the text width E, a
``TextSpaceProjection`` owned by the training model (not the network, so official checkpoints keep their keys) maps
the prompt into the text space.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import LOSS_REGISTRY

from ..utils.registry import register
from .precision import float32

ALIGNMENT_MODES = ('cosine', 'infonce')
#: Two text embeddings whose cosine similarity reaches 1 - this are the same text (e.g. a source's mean fallback).
SAME_TEXT_TOLERANCE = 1e-5


class TextSpaceProjection(nn.Module):
    """Learned linear map of domain representations ``[B, D]`` into the text-embedding space ``[B, E]``.

    Args:
        prompt_dim: D, width of the domain prompt (or query).
        text_dim: E, width of the text embeddings (1024 for CLIP RN50).
        bias: add a bias (off by default: only directions matter to the cosine and InfoNCE losses).
    """

    def __init__(self, prompt_dim: int, text_dim: int, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(prompt_dim, text_dim, bias=bias)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.linear(prompt)


@register(LOSS_REGISTRY, aliases=('DomainPriorAlignmentLoss',))
class DATPRLDomainAlignmentLoss(nn.Module):
    """Align domain representations ``p`` ``[B, D]`` (projected to ``[B, E]`` if a projection is given) with their
    descriptions' text embeddings ``t`` ``[B, E]`` (constants: no gradient reaches them). With unit rows ``p̂``, ``t̂``:

        mode 'cosine':   L = mean_b (1 − p̂_b·t̂_b)
        mode 'infonce':  L = ½ [CE(p̂ t̂ᵀ/τ, Y) + CE(t̂ p̂ᵀ/τ, Y)]   (symmetric InfoNCE over the batch)

    where the target row ``Y_b`` is uniform over the samples whose text equals ``t_b`` (normally just ``b``; samples
    sharing a text, such as a source's mean-embedding fallback, are not pushed apart as negatives).
    The loss is ``loss_weight * L``, computed in float32.

    Args:
        loss_weight: multiplier (``clip_alignment_weight``; 1.0 in the 6T config).
        mode: 'cosine' (default) or 'infonce'.
        temperature: τ of the InfoNCE mode.
    """

    def __init__(self, loss_weight: float = 1.0, mode: str = 'cosine', temperature: float = 0.07):
        super().__init__()
        if mode not in ALIGNMENT_MODES:
            raise ValueError(f'alignment mode must be one of {ALIGNMENT_MODES}, got {mode!r}')
        if temperature <= 0:
            raise ValueError(f'alignment temperature must be positive, got {temperature}')
        self.loss_weight = loss_weight
        self.mode = mode
        self.temperature = temperature

    def forward(self, prompt: torch.Tensor, text: torch.Tensor,
                projection: Optional[nn.Module] = None) -> torch.Tensor:
        """prompt ``[B, D]``, text ``[B, E]``, optional projection ``D -> E`` -> scalar."""
        with float32(prompt.device):
            prompt = prompt.float() if projection is None else projection(prompt.float())
            text = text.detach().float().to(prompt.device)
            if prompt.dim() != 2 or prompt.shape != text.shape:
                hint = (' Give the loss a TextSpaceProjection(D, E) owned by the model.'
                        if prompt.dim() == 2 and text.dim() == 2 and len(prompt) == len(text) else '')
                raise ValueError(f'alignment needs (projected) prompts [B, E] and text embeddings [B, E], got '
                                 f'{tuple(prompt.shape)} and {tuple(text.shape)}.{hint}')
            prompt_unit, text_unit = F.normalize(prompt, dim=-1), F.normalize(text, dim=-1)
            if self.mode == 'cosine':
                return self.loss_weight * (1 - (prompt_unit * text_unit).sum(dim=-1)).mean()
            itself = torch.eye(len(text_unit), dtype=torch.bool, device=text_unit.device)
            same_text = ((text_unit @ text_unit.t() >= 1 - SAME_TEXT_TOLERANCE) | itself).float()
            targets = same_text / same_text.sum(dim=1, keepdim=True)
            logits = prompt_unit @ text_unit.t() / self.temperature
            prompt_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
            text_to_prompt = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
            return self.loss_weight * 0.5 * (prompt_to_text + text_to_prompt)
