"""Prompt pools: learnable (key, value) prompts retrieved by cosine similarity (the paper's PCM).

A pool holds ``P`` keys ``[P, D]`` and values ``[P, T, D]``. A query ``[B, D]`` selects its ``k`` most similar keys;
the selected values are composed with softmax weights over the selected similarities, flattened token-major to
``[B, T*D]`` and aggregated to one prompt ``[B, D]``. The task pool and the domain pool are two instances.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

TEMPERATURE_RANGE = (0.1, 2.0)  # the learned temperature is clamped to this range (no gradient outside it)
SELECTION_NOISE_STD = 0.1  # std of the Gaussian noise added to the scaled similarities for top-k in training
INIT_NOISE_STD = 0.5  # std of the noise added at init to every prompt but the first


def autocast_off(device: torch.device):
    """Autocast disabled on ``device``'s type (nothing to disable where autocast does not exist, e.g. ``meta``).

    Kept here rather than imported from ``losses.precision``: this module needs nothing but torch."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


@dataclass(frozen=True)
class PoolSpec:
    """Size P, width D and selection count k of one prompt pool."""
    size: int
    dim: int
    top_k: int

    def check(self, prefix: str = '') -> None:
        """Raise ``ValueError`` unless P, D >= 1 and 1 <= k <= P; messages name ``<prefix>pool_size`` etc. (the
        networks' official arguments: ``degradation_``, ``domain_``)."""
        for name, value in ((f'{prefix}pool_size', self.size), (f'{prefix}prompt_dim', self.dim)):
            if value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value}')
        if not 1 <= self.top_k <= self.size:
            raise ValueError(f'{prefix}top_k must lie in [1, {prefix}pool_size={self.size}], got {self.top_k}')


def check_value_tokens(count: int) -> None:
    """Raise ``ValueError`` unless a prompt has at least one value token."""
    if count < 1:
        raise ValueError(f'value_num_tokens must be a positive integer, got {count}')


class PoolOutput(NamedTuple):
    """What one pool retrieval produced, for the network and for the prompt-pool losses.

    prompt: composed prompt ``[B, D]``; indices: selected prompts ``[B, k]`` (int64, best first);
    logits: temperature-scaled cosine similarities to every key ``[B, P]`` (clean, no selection noise);
    weights: composition weights of the selected prompts ``[B, k]``.
    """
    prompt: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    weights: torch.Tensor


class PromptPool(nn.Module):
    """A pool of ``pool_size`` prompts of width ``prompt_dim``, each a key and ``value_num_tokens`` value tokens.

    Args:
        pool_size: number of prompts P.
        prompt_dim: prompt and query width D.
        top_k: prompts composed per query k (k >= 2 for the keys to receive a gradient).
        value_num_tokens: value tokens T per prompt; they are flattened into one ``T*D`` vector before aggregation.
    """

    def __init__(self, pool_size: int, prompt_dim: int, top_k: int, value_num_tokens: int):
        super().__init__()
        PoolSpec(pool_size, prompt_dim, top_k).check()
        check_value_tokens(value_num_tokens)
        self.top_k = top_k
        self.prompt_keys = nn.Parameter(torch.empty(pool_size, prompt_dim))
        self.prompt_values = nn.Parameter(torch.empty(pool_size, value_num_tokens, prompt_dim))
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.value_aggregation = nn.Sequential(
            nn.Linear(value_num_tokens * prompt_dim, prompt_dim), nn.LayerNorm(prompt_dim), nn.GELU())
        self.reset_prompts()

    @torch.no_grad()
    def reset_prompts(self, rows: torch.Tensor | None = None) -> None:
        """(Re-)initialise prompt rows as the official code does: xavier rows in the first half, random unit rows
        in the second, then noise of std ``INIT_NOISE_STD`` on every row but row 0. ``rows`` defaults to all."""
        pool_size = self.prompt_keys.shape[0]
        for i in range(pool_size) if rows is None else rows.tolist():
            init = nn.init.xavier_uniform_ if i < pool_size // 2 else nn.init.orthogonal_
            init(self.prompt_keys[i:i + 1])
            for t in range(self.prompt_values.shape[1]):
                init(self.prompt_values[i:i + 1, t:t + 1])
            if i >= 1:
                self.prompt_keys[i].add_(INIT_NOISE_STD * torch.randn_like(self.prompt_keys[i]))
                self.prompt_values[i].add_(INIT_NOISE_STD * torch.randn_like(self.prompt_values[i]))

    def forward(self, query: torch.Tensor) -> PoolOutput:
        """query ``[B, D]`` -> composed prompt ``[B, D]`` with the selection that produced it.

        The similarities, the top-k ranking and ``logits`` (the balance loss's input) are float32 also under
        ``torch.autocast``: bf16 keeps 2 to 3 significant digits of a cosine, which reorders close prompts."""
        with autocast_off(query.device):
            similarity = F.normalize(query.float(), dim=-1) @ F.normalize(self.prompt_keys.float(), dim=-1).t()
            logits = similarity / self.temperature.float().clamp(*TEMPERATURE_RANGE)
        ranking = logits + SELECTION_NOISE_STD * torch.randn_like(logits) if self.training else logits
        indices = ranking.topk(self.top_k, dim=-1).indices
        weights = logits.gather(-1, indices).softmax(dim=-1)
        composed = torch.einsum('bk,bktd->btd', weights, self.prompt_values[indices])
        prompt = self.value_aggregation(composed.flatten(1))
        return PoolOutput(prompt, indices, logits, weights)
