"""The prompt-pool objectives of a training step, built from the official ``train:`` keys.

Reads the network's last retrieval (``net.prompt_state``) and the batch labels, and returns the weighted terms:

- ``l_div``: ``prompt_diversity_weight`` (6T: 1.0), ``diversity_temperature`` (0.1); prompts of a pool stay apart.
- ``l_bal``: ``prompt_balance_weight`` (0.1), ``balance_mode``; soft pool usage stays near uniform.
- ``l_con``, ``l_con_dom``: ``prompt_contrastive_weight`` (0.1), ``contrastive_temperature``; SupCon on task queries
  with task labels, domain queries with domain labels.
- ``l_align``: ``use_clip_constraint``, ``clip_alignment_weight`` (1.0); domain prompts pulled to their images'
  description embeddings.

A network whose prompt comes from a prompt mode (``PromptedBackbone`` with ``prompt: {type: ...}``) has no pools:
its terms are the mode's own (``l_cls``, ``l_prompt_con``, ``l_assign``, ``l_kl``), weighted by the mode's options.

Hard usage counters are kept over windows of ``stats_update_freq`` iterations and logged; with ``reinit_prompts``
prompts never selected in a window are re-initialised. The alignment's projection (when the prompt and text widths
differ) is owned here, so the network's state_dict keeps the official keys.

The description embeddings of ``l_align`` come from ``text_embeddings`` or ``text_description_paths``
(:func:`datprl_arch.priors.training.training_embeddings`); ``use_clip_constraint: true`` without either is an error
(:func:`~datprl_arch.priors.training.clip_constraint_problem`). Set ``use_clip_constraint: false`` to train without
the constraint.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from basicsr.utils import get_root_logger

from ..archs.prompt.modes import ModeState
from ..losses import (DATPRLBalanceLoss, DATPRLDiversityLoss, DATPRLDomainAlignmentLoss, DATPRLSupConLoss,
                      TextSpaceProjection)
from ..options import OptionFileError
from ..priors.training import clip_constraint_problem, training_embeddings
from .prompt_usage import PromptUsageTracker, reinitialise_prompts

OBJECTIVE_KEYS = (
    'use_clip_constraint', 'clip_model', 'clip_weights', 'text_encoder', 'clip_alignment_weight',
    'text_description_paths', 'text_embeddings', 'alignment_mode', 'alignment_temperature', 'alignment_target',
    'prompt_diversity_weight', 'diversity_temperature', 'prompt_balance_weight', 'balance_mode',
    'stats_update_freq', 'reinit_prompts', 'prompt_contrastive_weight', 'contrastive_temperature')
DEFAULT_STATS_FREQ = 5000
ALIGNMENT_TARGETS = ('domain_prompt', 'domain_query', 'prompt')


def _pools(net: nn.Module) -> 'OrderedDict[str, nn.Module]':
    """The network's prompt pools by role (``PromptSystem.prompt_pools``); none for a network without prompts."""
    return net.prompt_pools() if hasattr(net, 'prompt_pools') else OrderedDict()


def _train_source_names(opt: dict) -> list[str]:
    train = opt.get('datasets', {}).get('train', {})
    return [str(s.get('name', i)) for i, s in enumerate(train.get('datasets') or [])]


class PromptObjectives(nn.Module):
    """Prompt-pool losses and usage statistics of one training run (see the module docstring)."""

    def __init__(self, train_opt: dict, opt: dict, net: nn.Module):
        super().__init__()
        self.pools = list(_pools(net))
        weights = {key: float(train_opt.get(key) or 0) for key in
                   ('prompt_diversity_weight', 'prompt_balance_weight', 'prompt_contrastive_weight')}
        if not self.pools and (any(weights.values()) or train_opt.get('use_clip_constraint')):
            raise ValueError(f'{type(net).__name__} has no prompt pools; prompt-pool losses need a DATPRL network')
        self.diversity = (DATPRLDiversityLoss(weights['prompt_diversity_weight'],
                                              float(train_opt.get('diversity_temperature', 0.1)))
                          if weights['prompt_diversity_weight'] else None)
        self.balance = (DATPRLBalanceLoss(weights['prompt_balance_weight'], train_opt.get('balance_mode', 'square'))
                        if weights['prompt_balance_weight'] else None)
        self.contrastive = (DATPRLSupConLoss(weights['prompt_contrastive_weight'],
                                             float(train_opt.get('contrastive_temperature', 0.1)))
                            if weights['prompt_contrastive_weight'] else None)
        self.tracker = (PromptUsageTracker({name: _pools(net)[name].prompt_keys.shape[0] for name in self.pools},
                                           int(train_opt.get('stats_update_freq', DEFAULT_STATS_FREQ)))
                        if self.pools else None)
        self.reinit = bool(train_opt.get('reinit_prompts'))
        self.pending_indices: dict = {}  # this step's selections, counted by end_step unless the step was skipped
        self.alignment, self.projection, self.texts = None, None, None
        if train_opt.get('use_clip_constraint'):
            self.texts = training_embeddings(train_opt, _train_source_names(opt))
            if self.texts is None:
                raise OptionFileError(f'train.{clip_constraint_problem(train_opt)}')
            self._setup_alignment(train_opt, net)

    # ------------------------------------------------------------ setup
    def _setup_alignment(self, train_opt: dict, net: nn.Module) -> None:
        target = train_opt.get('alignment_target', 'domain_prompt' if 'domain' in self.pools else 'prompt')
        if target not in ALIGNMENT_TARGETS:
            raise ValueError(f"train.alignment_target must be one of {ALIGNMENT_TARGETS}, got '{target}'")
        if target.startswith('domain') and 'domain' not in self.pools:
            raise ValueError(f"alignment_target '{target}' needs a domain pool; {type(net).__name__} has only the "
                             "task pool: use alignment_target: prompt")
        self.alignment_target = target
        width = self._representation_width(net, target)
        if width != self.texts.dim:
            self.projection = TextSpaceProjection(width, self.texts.dim)
        self.alignment = DATPRLDomainAlignmentLoss(float(train_opt.get('clip_alignment_weight', 1.0)),
                                                   train_opt.get('alignment_mode', 'cosine'),
                                                   float(train_opt.get('alignment_temperature', 0.07)))

    @staticmethod
    def _representation_width(net: nn.Module, target: str) -> int:
        if target == 'prompt':
            return net.prompt_width
        return _pools(net)['domain'].prompt_keys.shape[1]

    # ------------------------------------------------------------ per step
    def forward(self, net: nn.Module, labels: dict, gt_paths: Sequence[str],
                source_names: Optional[Sequence[str]] = None) -> 'OrderedDict[str, torch.Tensor]':
        """Weighted prompt-pool terms of the batch the network just processed."""
        terms = OrderedDict()
        state = getattr(net, 'prompt_state', None)
        if state is None:
            return terms
        if isinstance(state, ModeState):  # a prompt mode: its own weighted terms (no pools)
            terms.update(state.losses)
            return terms
        pools = _pools(net)
        outputs = {'task': state.task, 'domain': state.domain}
        if self.tracker is not None and torch.is_grad_enabled():
            self.pending_indices = {name: outputs[name].indices.detach() for name in self.pools}
        if self.diversity is not None:
            terms['l_div'] = self.diversity(*pools.values())
        if self.balance is not None:
            terms['l_bal'] = self.balance(*(outputs[name] for name in self.pools))
        if self.contrastive is not None:
            for name, query, label in (('l_con', state.task_query, 'task'),
                                       ('l_con_dom', state.domain_query, 'domain')):
                if query is None:
                    continue
                if label not in labels:
                    raise ValueError(f'prompt_contrastive_weight needs {label} labels in the batch; use the '
                                     'multi-domain dataset (DATPRLMultiDomainDataset) for training')
                terms[name] = self.contrastive(query, labels[label])
        if self.alignment is not None:
            representation = {'domain_prompt': state.domain.prompt if state.domain else None,
                              'domain_query': state.domain_query, 'prompt': state.prompt}[self.alignment_target]
            text = self.texts.lookup(gt_paths, source_names, device=representation.device)
            terms['l_align'] = self.alignment(representation, text, self.projection)
        return terms

    def end_step(self, net: nn.Module, current_iter: int, optimizer: Optional[torch.optim.Optimizer],
                 counted: bool = True) -> dict:
        """Count the step's selections (not those of a skipped step: ``counted=False``); every ``stats_update_freq``
        iterations: log the window's hard usage, re-initialise unused prompts if asked; returns values for BasicSR's
        message logger (fraction of prompts used per pool)."""
        pending, self.pending_indices = self.pending_indices, {}
        if self.tracker is not None and counted:
            for name, indices in pending.items():
                self.tracker.update(name, indices)
        usage = self.tracker.step(current_iter) if self.tracker is not None else None
        if not usage:
            return {}
        logger, pools, logs = get_root_logger(), _pools(net), {}
        for name, pool_usage in usage.items():
            logger.info(f'Prompt usage, {name} pool, iters {current_iter - self.tracker.update_freq + 1}-'
                        f'{current_iter}: {pool_usage.summary()}')
            logs[f'used_{name}'] = float((pool_usage.counts > 0).float().mean())
            if self.reinit and pool_usage.unused:
                reinitialise_prompts(pools[name], pool_usage.unused, optimizer)
                logger.info(f'Re-initialised {name} prompts {pool_usage.unused}')
        return logs

    def consolidate_stats(self) -> None:
        """Before a training state is saved, on every rank: the window's usage counts of all ranks go to rank 0
        (``PromptUsageTracker.consolidate``, a collective under torch.distributed)."""
        if self.tracker is not None:
            self.tracker.consolidate()

    def stats_state(self) -> dict:
        """Usage counters of the current window, for training states (all ranks' after ``consolidate_stats``)."""
        return self.tracker.state() if self.tracker else {}

    def load_stats_state(self, counts: dict) -> None:
        """Resume the window from a training state's counters; under torch.distributed rank 0 holds them."""
        if self.tracker is not None:
            self.tracker.load_state(counts)
