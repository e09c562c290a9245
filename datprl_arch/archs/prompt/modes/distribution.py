"""DPPD's dynamic prompts (Wu et al. 2025; no public code: our reconstruction, docs/method.md): degradation
prototype assignment (DPA) and prompt distribution learning (PDL).

DPA: the task tap's features give a degradation query ``q`` ``[B, D]`` (a pool query as DATPRL's); with ``K``
learned prototypes ``c_k`` and cosine similarities ``s_k = cos(q, c_k)``, a sample is assigned to its ``top_k``
nearest prototypes with weights ``a = softmax(s / tau)`` over those (zero elsewhere). The assignment loss
``assignment_weight * mean(1 - sum_k a_k s_k)`` pulls each query and its prototypes together (unsupervised: it
needs no labels; DPPD calls its prototypes predefined, ours are learned, as the issue asks).
PDL: prototype ``k`` owns a diagonal Gaussian ``N(mu_k, diag(exp(logvar_k)))`` over prompts ``[P]``; a sample's
prompt distribution is the assignment's mixture of moments, ``mu = a mu_K``, ``var = a exp(logvar_K)``. Training
forwards sample ``mu + sqrt(var) * eps`` (reparameterised), evaluation uses ``mu``. The KL term
``kl_weight * mean_k KL(N(mu_k, var_k) || N(0, I))`` (per dimension) keeps the variances from collapsing.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..pool import autocast_off
from ..query import QUERY_GRIDS, PoolQuery
from .base import DEFAULT_WIDTH, ModeState, PromptMode, check_positive, check_weight, register_mode

DEFAULT_PROTOTYPES = 8
DEFAULT_QUERY_DIM = 64
DEFAULT_TOP_K = 2
DEFAULT_TEMPERATURE = 0.1
DEFAULT_ASSIGNMENT_WEIGHT = 0.1
DEFAULT_KL_WEIGHT = 1e-3
INITIAL_STD = 0.1  # the prompts' standard deviation at initialisation


def assign(query: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float):
    """Query ``[B, D]``, prototypes ``[K, D]`` -> (similarities ``[B, K]``, weights ``[B, K]``: softmax of
    ``s / temperature`` over each row's ``top_k`` largest similarities, zero elsewhere).

    In float32 also under ``torch.autocast``, as the pools' similarities: bf16 keeps 2 to 3 significant digits of a
    cosine, which reorders close prototypes and quantises the assignment loss near its optimum."""
    with autocast_off(query.device):
        sims = F.normalize(query.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).t()
        top = sims.topk(top_k, dim=-1)
        weights = torch.zeros_like(sims).scatter(-1, top.indices, (top.values / temperature).softmax(dim=-1))
    return sims, weights


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over the elements of ``KL(N(mean, exp(logvar)) || N(0, 1)) = (exp(logvar) + mean^2 - 1 - logvar) / 2``."""
    return 0.5 * (logvar.exp() + mean.square() - 1 - logvar).mean()


@register_mode
class DistributionPrompt(PromptMode):
    """Prompts sampled from prototype-anchored Gaussians (see the module docstring).

    Args:
        tap_channels: channels by tap (``task``: the backbone features the degradation query reads).
        width: prompt width P.
        prototypes: number K of degradation prototypes.
        query_dim: width D of the degradation query and the prototypes.
        top_k: prototypes each sample is assigned to.
        temperature: of the assignment softmax.
        assignment_weight, kl_weight: weights of the assignment and KL terms.
    """

    taps = ('task',)

    def __init__(self, tap_channels: Mapping[str, int], width: int = DEFAULT_WIDTH,
                 prototypes: int = DEFAULT_PROTOTYPES, query_dim: int = DEFAULT_QUERY_DIM, top_k: int = DEFAULT_TOP_K,
                 temperature: float = DEFAULT_TEMPERATURE, assignment_weight: float = DEFAULT_ASSIGNMENT_WEIGHT,
                 kl_weight: float = DEFAULT_KL_WEIGHT):
        super().__init__()
        name = type(self).__name__
        self.prompt_width = check_positive(width, 'width', name, integer=True)
        check_positive(prototypes, 'prototypes', name, integer=True)
        check_positive(query_dim, 'query_dim', name, integer=True)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= prototypes:
            raise ValueError(f'{name}: top_k must lie in [1, prototypes={prototypes}], got {top_k!r}')
        self.top_k, self.temperature = top_k, check_positive(temperature, 'temperature', name)
        self.assignment_weight = check_weight(assignment_weight, 'assignment_weight', name)
        self.kl_weight = check_weight(kl_weight, 'kl_weight', name)
        self.query = PoolQuery(tap_channels['task'], query_dim, QUERY_GRIDS['task'])
        self.prototypes = nn.Parameter(torch.randn(prototypes, query_dim))
        self.prompt_mean = nn.Parameter(torch.randn(prototypes, width))
        self.prompt_logvar = nn.Parameter(torch.full((prototypes, width), 2 * math.log(INITIAL_STD)))

    def forward(self, features: Mapping[str, torch.Tensor], task_labels: Optional[torch.Tensor]) -> ModeState:
        sims, weights = assign(self.query(features['task']), self.prototypes, self.top_k, self.temperature)
        mean = weights @ self.prompt_mean
        losses = {}
        if self.training:
            std = (weights @ self.prompt_logvar.exp()).sqrt()
            prompt = mean + std * torch.randn_like(mean)
            if self.assignment_weight:
                losses['l_assign'] = self.assignment_weight * (1 - (weights * sims).sum(dim=-1)).mean()
            if self.kl_weight:
                losses['l_kl'] = self.kl_weight * gaussian_kl(self.prompt_mean, self.prompt_logvar)
        else:
            prompt = mean
        return ModeState(prompt, losses)
