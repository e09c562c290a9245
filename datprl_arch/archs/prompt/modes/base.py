"""What every prompt mode is: a module that turns tapped features (and, in training, task labels) into the prompt
``[B, P]`` that a :class:`~datprl_arch.archs.prompted_backbone_arch.PromptedBackbone` injects through gated fusion.

The dual pools of DATPRL are the wrapper's default and live in :class:`~..system.PromptSystem`; the modes here are
the related methods' ways of making the same prompt (``prompt: {type: <mode>, ...}`` in the option file). A mode
reads named taps: ``input`` (the wrapper's input image ``[B, C, H, W]``) or the backbone features ``task`` and
``domain`` (the ``taps`` option). Its auxiliary losses (classifier, contrastive, assignment, KL terms), already
weighted, come back with the prompt in a :class:`ModeState`; the training model adds them to the objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

INPUT_TAP = 'input'  # the wrapper's input image [B, C, H, W]
DEFAULT_WIDTH = 64  # prompt width P of the modes (the demo's pool dim)
PROMPT_MODES: dict[str, type] = {}


def register_mode(cls: type) -> type:
    """Class decorator: make ``cls`` selectable as ``prompt: {type: <class name>}``."""
    PROMPT_MODES[cls.__name__] = cls
    return cls


@dataclass
class ModeState:
    """One forward's prompt: ``prompt`` ``[B, P]``; ``losses``: weighted auxiliary terms (training forwards with
    what they need, else empty); ``task_logits`` ``[B, T]``: the task classifier's, where the mode has one."""
    prompt: torch.Tensor
    losses: dict = field(default_factory=dict)
    task_logits: Optional[torch.Tensor] = None


class PromptMode(nn.Module):
    """Base of the prompt modes.

    Subclasses set ``taps`` (what ``forward`` reads), ``prompt_width`` and, for modes with one prompt per task,
    ``task_names`` (the task labels in order: ``--task NAME`` and the training batches' ``task_name`` are looked up
    there) and :meth:`task_prompt`.
    """

    taps: tuple[str, ...] = (INPUT_TAP,)
    task_names: tuple[str, ...] = ()
    prompt_width: int = DEFAULT_WIDTH

    def forward(self, features: Mapping[str, torch.Tensor], task_labels: Optional[torch.Tensor]) -> ModeState:
        """``features`` by tap, ``task_labels`` ``[B]`` (indices into ``task_names``; None at test time) ->
        the prompt and its auxiliary losses."""
        raise NotImplementedError

    def task_prompt(self, index: int) -> torch.Tensor:
        """The prompt ``[1, P]`` of task ``task_names[index]`` (modes with one prompt per task)."""
        raise ValueError(f'{type(self).__name__} has no prompt per task; --task and task blends need '
                         'ExplicitPrompt or LowRankPrompt')


def check_tasks(tasks, mode: str) -> tuple[str, ...]:
    """``tasks`` as a tuple of distinct names (at least two), else ``ValueError`` naming the mode."""
    if isinstance(tasks, str) or not tasks or len(tasks) < 2:
        raise ValueError(f'{mode} needs tasks: a list of at least two task names (the training set\'s task '
                         f'labels), got {tasks!r}')
    names = tuple(str(t) for t in tasks)
    if len(set(names)) != len(names):
        raise ValueError(f'{mode}: tasks must be distinct, got {list(names)}')
    return names


def check_positive(value, name: str, mode: str, integer: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = 'a positive integer' if integer else 'a positive number'
        raise ValueError(f'{mode}: {name} must be {what}, got {value!r}')
    return value


def check_weight(value, name: str, mode: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f'{mode}: {name} must be a number >= 0 (0 turns the term off), got {value!r}')
    return float(value)
