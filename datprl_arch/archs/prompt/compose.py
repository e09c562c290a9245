"""Composition of the domain prompt and the task prompt into one domain-aware task prompt.

``cross_attention`` (the paper's setting) lets the domain prompt ``d`` attend to the task prompt ``g``; with a single
key the attention weight is exactly 1, so the attention is a linear map of ``g`` (``SingleKeyAttention``), followed
by ``h = LN(d + attn)`` and ``c = h + FFN(h)``. ``concat`` stacks ``[d ; g]``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

COMPOSITIONS = ('cross_attention', 'concat')
ATTENTION_HEADS = 8
DROPOUT = 0.1


class SingleKeyAttention(nn.Module):
    """Multi-head attention of one query token over one key/value token, in ``nn.MultiheadAttention``'s layout.

    Parameters keep MultiheadAttention's names and shapes (``in_proj_weight [3E, E]`` holding q|k|v rows,
    ``in_proj_bias [3E]``, ``out_proj``) so official checkpoints load. Since the softmax runs over a single key its
    weight is 1 and the output is ``out_proj(dropout_per_head(W_v g + b_v))``: the q and k projections cannot affect
    it. ``lean`` allocates only the value rows (``in_proj_weight [E, E]``); loading a full checkpoint slices them.
    ``literal`` runs the full multi-head attention as the official code does (the benchmark baseline).
    """

    def __init__(self, embed_dim: int, num_heads: int = ATTENTION_HEADS, dropout: float = DROPOUT,
                 lean: bool = False, literal: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'prompt dim {embed_dim} must be divisible by the {num_heads} attention heads')
        if lean and literal:
            raise ValueError('lean=True drops the q/k projections that literal=True computes; choose one')
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.lean, self.literal = lean, literal
        rows = embed_dim if lean else 3 * embed_dim
        self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(rows))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _value_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed_dim
        return self.in_proj_weight[-e:], self.in_proj_bias[-e:]

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query, value ``[B, E]`` -> ``[B, E]``."""
        if self.literal:
            out, _ = F.multi_head_attention_forward(
                query[None], value[None], value[None], self.embed_dim, self.num_heads, self.in_proj_weight,
                self.in_proj_bias, None, None, False, self.dropout, self.out_proj.weight, self.out_proj.bias,
                training=self.training, need_weights=False)
            return out[0]
        v = F.linear(value, *self._value_projection())
        if self.training and self.dropout > 0:  # dropout on the 1x1 attention weight of each (sample, head)
            keep = torch.rand(v.shape[0], self.num_heads, 1, device=v.device) >= self.dropout
            v = (v.view(v.shape[0], self.num_heads, -1) * keep / (1 - self.dropout)).view_as(v)
        return self.out_proj(v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.lean:  # accept full (official) checkpoints: keep only the value rows
            for name in ('in_proj_weight', 'in_proj_bias'):
                key = prefix + name
                if key in state_dict and state_dict[key].shape[0] == 3 * self.embed_dim:
                    state_dict[key] = state_dict[key][-self.embed_dim:]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_composition(composition: str, domain_dim: int, task_dim: int) -> None:
    """Raise ``ValueError`` unless ``composition`` can compose a ``domain_dim`` and a ``task_dim`` prompt."""
    if composition not in COMPOSITIONS:
        raise ValueError(f"prompt_fusion_method must be one of {COMPOSITIONS}, got '{composition}'")
    if composition != 'cross_attention':
        return
    if domain_dim != task_dim:
        raise ValueError(f"prompt_fusion_method 'cross_attention' needs domain_prompt_dim == degradation_prompt_dim, "
                         f'got {domain_dim} and {task_dim}')
    if domain_dim % ATTENTION_HEADS:
        raise ValueError(f"prompt_fusion_method 'cross_attention' needs a prompt dim divisible by its "
                         f'{ATTENTION_HEADS} attention heads, got {domain_dim}')


def feed_forward(dim: int, expansion: int = 2, dropout: float = DROPOUT) -> nn.Sequential:
    """The composition's residual feed-forward ``Linear(E, 2E), GELU, Dropout, Linear(2E, E)``."""
    return nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(expansion * dim, dim))
