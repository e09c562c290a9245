"""MiO IR's prompts (Kong et al. 2024): explicit prompts, one per task label, and adaptive prompts made from the
degraded input itself.

Explicit: MiO feeds a fixed random map per task through its prompt encoder, so each task's prompt is a constant
vector; we learn that vector directly (``nn.Embedding``, the same function class without the encoder). Training
forwards take the task from the batch's labels; test forwards from a task classifier on the input, trained alongside
with cross-entropy (``classifier_weight``; MiO trains its classifier separately: ours reads only the image, so joint
training does not change what it learns), or from the user (``--task NAME``: :meth:`ExplicitPrompt.task_prompt`).
Adaptive: MiO's prompt encoder (:class:`~.encoder.ImageEncoder`) on the input image, then a linear layer to the
prompt width; no labels.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ....errors import NetworkOptionError
from .base import (DEFAULT_WIDTH, INPUT_TAP, ModeState, PromptMode, check_positive, check_tasks, check_weight,
                   register_mode)
from .encoder import ImageEncoder, TaskClassifier

DEFAULT_CLASSIFIER_WEIGHT = 0.1


def classifier_loss(logits: torch.Tensor, labels: Optional[torch.Tensor], weight: float, training: bool) -> dict:
    """``{'l_cls': weight * CE(logits, labels)}`` in training forwards with labels, else nothing."""
    if not training or labels is None or not weight:
        return {}
    return {'l_cls': weight * F.cross_entropy(logits.float(), labels)}


@register_mode
class ExplicitPrompt(PromptMode):
    """One learned prompt per task; the label picks it (see the module docstring).

    Args:
        tap_channels: channels by tap (``input``: the image's).
        tasks: the task names, in any order (training batches are matched by ``task_name``).
        width: prompt width P.
        classifier_weight: weight of the task classifier's cross-entropy.
    """

    def __init__(self, tap_channels: Mapping[str, int], tasks: Sequence[str], width: int = DEFAULT_WIDTH,
                 classifier_weight: float = DEFAULT_CLASSIFIER_WEIGHT):
        super().__init__()
        self.task_names = check_tasks(tasks, type(self).__name__)
        self.prompt_width = check_positive(width, 'width', type(self).__name__, integer=True)
        self.classifier_weight = check_weight(classifier_weight, 'classifier_weight', type(self).__name__)
        self.task_prompts = nn.Embedding(len(self.task_names), width)
        self.classifier = TaskClassifier(tap_channels[INPUT_TAP], len(self.task_names))

    def forward(self, features: Mapping[str, torch.Tensor], task_labels: Optional[torch.Tensor]) -> ModeState:
        """Training takes the prompt of each image's task label; evaluation that of the label when given, else of
        the classifier's choice. Refused where the prompt would come from a classifier that never trained (no
        labels in training; ``classifier_weight: 0`` in evaluation without labels): ``--task NAME`` chooses."""
        name = type(self).__name__
        if task_labels is None and self.training:
            raise NetworkOptionError(f'{name} trains on task labels, and this batch has none (no task_name): use a '
                                     'dataset that labels its sources (DATPRLMultiDomainDataset with a task per '
                                     'source)')
        if task_labels is None and not self.classifier_weight:
            raise NetworkOptionError(f'{name} was trained with classifier_weight: 0, so its task classifier is '
                                     'untrained and cannot choose the prompt: give the task (restore --task NAME, '
                                     'benchmark --task-prompts)')
        if not self.classifier_weight:  # the classifier is not trained: not run either (no unused DDP parameters)
            return ModeState(self.task_prompts(task_labels), {})
        logits = self.classifier(features[INPUT_TAP])
        index = task_labels if task_labels is not None else logits.argmax(dim=-1)
        return ModeState(self.task_prompts(index), classifier_loss(logits, task_labels, self.classifier_weight,
                                                                   self.training), logits)

    def untrained_parameter_names(self) -> set[str]:
        """The classifier's parameters when ``classifier_weight`` is 0: no loss reaches them (frozen, so that DDP
        does not wait for their gradients)."""
        return set() if self.classifier_weight else {f'classifier.{n}' for n, _ in self.classifier.named_parameters()}

    def task_prompt(self, index: int) -> torch.Tensor:
        return self.task_prompts.weight[index:index + 1]


@register_mode
class AdaptivePrompt(PromptMode):
    """MiO's adaptive prompt: image ``[B, C, H, W]`` -> encoder -> linear -> prompt ``[B, width]``.

    Args:
        tap_channels: channels by tap (``input``: the image's).
        width: prompt width P.
    """

    def __init__(self, tap_channels: Mapping[str, int], width: int = DEFAULT_WIDTH):
        super().__init__()
        self.prompt_width = check_positive(width, 'width', type(self).__name__, integer=True)
        self.encoder = ImageEncoder(tap_channels[INPUT_TAP])
        self.projection = nn.Linear(self.encoder.out_channels, width)

    def forward(self, features: Mapping[str, torch.Tensor], task_labels: Optional[torch.Tensor]) -> ModeState:
        return ModeState(self.projection(self.encoder(features[INPUT_TAP])))
