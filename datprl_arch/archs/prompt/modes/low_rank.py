"""TAP's task-aware low-rank prompts (Wang et al. 2025; no public code: our reconstruction, docs/method.md).

Every task's prompt is a task-general part plus a task-specific combination of a shared low-rank basis:

    p_t = g + c_t B        g [P] (shared), B [r, P] (shared basis), c_t [r] (task t's coefficients)

A sample's prompt uses the weights ``w`` ``[T]`` of a task router on the input image: ``p = g + (w C) B``, linear in
``w``, so ``--task NAME`` is ``w = one-hot`` and a blend of two tasks is the blend of their prompts. The router runs
in training too (the same prompt path as at test time), with a cross-entropy on the batch's task labels
(``classifier_weight``); a supervised contrastive term on the per-sample prompts (``contrastive_weight``, SupCon)
pulls a task's prompts together and pushes different tasks' apart. TAP's second stage (tune only the prompts of a
frozen, pretrained restorer) is ``train.stages`` with ``freeze: [backbone]``.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ....losses import DATPRLSupConLoss
from .base import (DEFAULT_WIDTH, INPUT_TAP, ModeState, PromptMode, check_positive, check_tasks, check_weight,
                   register_mode)
from .encoder import TaskClassifier
from .mio import DEFAULT_CLASSIFIER_WEIGHT, classifier_loss

DEFAULT_RANK = 4
DEFAULT_CONTRASTIVE_WEIGHT = 0.1
DEFAULT_TEMPERATURE = 0.1


def low_rank_prompts(general: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """``g [P]``, ``C [T, r]``, ``B [r, P]``, task weights ``w [N, T]`` -> prompts ``g + (w C) B`` ``[N, P]``."""
    return general + (weights @ coefficients) @ basis


@register_mode
class LowRankPrompt(PromptMode):
    """Low-rank task prompts with a task router (see the module docstring).

    Args:
        tap_channels: channels by tap (``input``: the image's).
        tasks: the task names (training batches are matched by ``task_name``).
        width: prompt width P.
        rank: rank r of the shared basis.
        classifier_weight: weight of the router's cross-entropy.
        contrastive_weight, temperature: the SupCon term on the prompts and its temperature.
    """

    def __init__(self, tap_channels: Mapping[str, int], tasks: Sequence[str], width: int = DEFAULT_WIDTH,
                 rank: int = DEFAULT_RANK, classifier_weight: float = DEFAULT_CLASSIFIER_WEIGHT,
                 contrastive_weight: float = DEFAULT_CONTRASTIVE_WEIGHT, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        name = type(self).__name__
        self.task_names = check_tasks(tasks, name)
        self.prompt_width = check_positive(width, 'width', name, integer=True)
        check_positive(rank, 'rank', name, integer=True)
        self.classifier_weight = check_weight(classifier_weight, 'classifier_weight', name)
        self.contrastive = DATPRLSupConLoss(check_weight(contrastive_weight, 'contrastive_weight', name),
                                            check_positive(temperature, 'temperature', name))
        tasks_n = len(self.task_names)
        self.general = nn.Parameter(torch.zeros(width))
        self.basis = nn.Parameter(torch.randn(rank, width) / math.sqrt(rank))  # unit-variance prompts at the start
        self.coefficients = nn.Parameter(torch.randn(tasks_n, rank))
        self.router = TaskClassifier(tap_channels[INPUT_TAP], tasks_n)

    def forward(self, features: Mapping[str, torch.Tensor], task_labels: Optional[torch.Tensor]) -> ModeState:
        logits = self.router(features[INPUT_TAP])
        prompt = low_rank_prompts(self.general, self.coefficients, self.basis, logits.softmax(dim=-1))
        losses = classifier_loss(logits, task_labels, self.classifier_weight, self.training)
        if self.training and task_labels is not None and self.contrastive.loss_weight:
            losses['l_prompt_con'] = self.contrastive(prompt, task_labels)
        return ModeState(prompt, losses, logits)

    def task_prompt(self, index: int) -> torch.Tensor:
        one_hot = torch.zeros(1, len(self.task_names), device=self.basis.device, dtype=self.basis.dtype)
        one_hot[0, index] = 1
        return low_rank_prompts(self.general, self.coefficients, self.basis, one_hot)
