"""Optimizers, learning-rate schedulers, parameter groups and freezing for the DATPRL model.

basicsr 1.4.2 knows only Adam and three schedulers; these factories add the common torch ones (and keep
BasicSR's restart schedulers under their BasicSR names), so option files can say ``type: AdamW`` etc.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_schedulers

from basicsr.models import lr_scheduler as basicsr_schedulers

from ..archs.prompt import prompt_parameter_names
from ..options import OptionFileError

OPTIMIZERS = {name: getattr(torch.optim, name) for name in
              ('Adam', 'AdamW', 'Adamax', 'SGD', 'ASGD', 'RMSprop', 'Rprop', 'NAdam', 'RAdam', 'Adagrad')}


class CosineAnnealingRestartCyclicLR(torch_schedulers.LRScheduler):
    """Cosine annealing in consecutive cycles of ``periods`` iterations, cycle ``i`` decaying to ``eta_mins[i]``
    (Restormer's schedule, e.g. periods [92000, 208000], eta_mins [3e-4, 1e-6])."""

    def __init__(self, optimizer, periods: Sequence[int], restart_weights: Sequence[float] = (1,),
                 eta_mins: Sequence[float] = (0,), last_epoch: int = -1):
        if not len(periods) == len(eta_mins) or len(restart_weights) not in (1, len(periods)):
            raise ValueError('CosineAnnealingRestartCyclicLR: periods, eta_mins (and restart_weights) must have '
                             f'one entry per cycle, got {list(periods)}, {list(eta_mins)}, {list(restart_weights)}')
        self.periods, self.eta_mins = list(periods), list(eta_mins)
        self.restart_weights = list(restart_weights) * (len(periods) if len(restart_weights) == 1 else 1)
        self.ends = [sum(self.periods[:i + 1]) for i in range(len(self.periods))]
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        step = min(self.last_epoch, self.ends[-1])
        cycle = next(i for i, end in enumerate(self.ends) if step <= end)
        start = self.ends[cycle] - self.periods[cycle]
        progress = (step - start) / self.periods[cycle]
        weight, eta_min = self.restart_weights[cycle], self.eta_mins[cycle]
        return [eta_min + weight * 0.5 * (base - eta_min) * (1 + math.cos(math.pi * progress))
                for base in self.base_lrs]


SCHEDULERS = {
    'MultiStepLR': basicsr_schedulers.MultiStepRestartLR,  # BasicSR maps this name to its restart variant
    'MultiStepRestartLR': basicsr_schedulers.MultiStepRestartLR,
    'CosineAnnealingRestartLR': basicsr_schedulers.CosineAnnealingRestartLR,
    'CosineAnnealingRestartCyclicLR': CosineAnnealingRestartCyclicLR,
    'CosineAnnealingLR': torch_schedulers.CosineAnnealingLR,
    'StepLR': torch_schedulers.StepLR,
    'ExponentialLR': torch_schedulers.ExponentialLR,
    'ConstantLR': torch_schedulers.ConstantLR,
    'LinearLR': torch_schedulers.LinearLR,
}


def build_optimizer(options: dict, param_groups: list) -> torch.optim.Optimizer:
    """``options`` is ``train.optim_g`` (``type`` plus the optimizer's keyword arguments, ``lr`` included)."""
    options = dict(options)
    name = options.pop('type', None)
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optim_g.type '{name}' is not supported; use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](param_groups, **options)


def build_scheduler(options: dict, optimizer: torch.optim.Optimizer):
    """``options`` is ``train.scheduler`` (``type`` plus the scheduler's keyword arguments)."""
    options = dict(options)
    name = options.pop('type', None)
    if name not in SCHEDULERS:
        raise ValueError(f"train.scheduler.type '{name}' is not supported; use one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, **options)


def resolve_parts(net: nn.Module, parts: Iterable[str], where: str = 'train.freeze') -> set[str]:
    """Parameter names of ``parts``: ``backbone``, ``prompts`` (the whole prompt system), or name prefixes such as
    ``degradation_prompt_pool`` or ``decoder_level1``. A part that matches nothing is an ``OptionFileError`` naming
    ``where`` (the option check finds it before anything runs: ``options_schema``)."""
    names = [n for n, _ in net.named_parameters()]
    prompt_names = prompt_parameter_names(net)
    selected = set()
    for part in parts:
        if part == 'prompts':
            match = prompt_names
        elif part == 'backbone':
            match = set(names) - prompt_names
        else:
            match = {n for n in names if n == part or n.startswith(part.rstrip('.') + '.')}
        if not match:
            raise OptionFileError(f"{where}: '{part}' matches no parameter of {type(net).__name__}; use "
                                  f"'backbone', 'prompts' or a parameter-name prefix such as "
                                  f"'{names[0].split('.')[0]}'")
        selected |= match
    return selected


def check_trainable(net: nn.Module, frozen: set[str], where: str, what: str) -> None:
    """An ``OptionFileError`` naming ``where`` when ``frozen`` (``what`` froze it, with the parameters that cannot
    affect the output) holds every parameter of ``net``: its first step would have no gradient to take."""
    names = [n for n, _ in net.named_parameters()]
    if names and frozen.issuperset(names):
        raise OptionFileError(f'{where}: {what} leaves no trainable parameter of {type(net).__name__} (all '
                              f'{len(names)} tensors frozen, nothing would train); unfreeze a part')


def parameter_groups(net: nn.Module, lr: float, prompt_lr: float | None) -> list[dict]:
    """Trainable parameters in one group, or two (backbone at ``lr``, prompt system at ``prompt_lr``)."""
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if prompt_lr is None:
        return [{'params': [p for _, p in trainable], 'name': 'all'}]
    prompt_names = prompt_parameter_names(net)
    backbone = [p for n, p in trainable if n not in prompt_names]
    prompts = [p for n, p in trainable if n in prompt_names]
    return [g for g in ({'params': backbone, 'lr': lr, 'name': 'backbone'},
                        {'params': prompts, 'lr': prompt_lr, 'name': 'prompts'}) if g['params']]
