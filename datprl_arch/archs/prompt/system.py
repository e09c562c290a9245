"""The prompt system of a DATPRL network: queries, the two pools and their composition, independent of the backbone.

The system reads named feature taps: ``domain`` (the domain query's input; our networks: the stem features) and
``task`` (the task query's input; our networks: the deepest encoder features), each a map ``[B, C, H, W]``. It is
used two ways:

- mixed into a network (our DATPRL networks, official parameter names at the top level of the state_dict). The
  constructor turns its prompt arguments (official names, ``prompt_arguments``) into a validated
  :class:`PromptConfig` (``configure_prompt``), builds its own layers (prompted blocks from the config), then calls
  ``build_prompt_system`` (so the prompt parameters follow the backbone's, as in official checkpoints). Its
  ``forward`` calls ``block_prompt({'domain': stem, 'task': deep})`` once and hands the prompt (None for the
  prompt-free backbone) to every prompted block;
- hosting another network (``PromptedBackbone``), whose forward hooks hand the tapped features to
  ``compose_prompt`` and the prompt to standalone gated fusions.

The last retrieval is kept in ``prompt_state`` for the prompt-pool losses and analysis, so the BasicSR ``forward(x)``
signature is unchanged; ``prompt_pools()`` and ``prompt_width`` are what the rest of the package reads.

For inference on parts of an image (tiles), ``compute_prompt(x)`` returns the prompt of a whole image without
running the rest of the network, and ``with net.fixed_prompt(prompt): net(tile)`` makes every forward in the block
use that prompt instead of retrieving one from its own input; outside the block nothing changes.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from .compose import SingleKeyAttention, feed_forward
from .config import PROMPT_ARGUMENTS, PromptConfig
from .pool import PoolOutput, PromptPool
from .query import QUERY_GRIDS, PoolQuery

TAPS = ('domain', 'task')  # the feature taps the queries read
PROMPT_MODULES = ('domain_prompt_pool', 'degradation_prompt_pool', 'domain_mapper', 'degradation_mapper',
                  'prompt_cross_attention', 'prompt_fusion_norm', 'prompt_fusion_ffn')


def prompt_parameter_names(net: nn.Module) -> set[str]:
    """Names of all parameters of ``net`` that belong to the prompt system: queries, pools, composition and every
    block's gated fusion (gates included). The rest is the backbone."""
    names = set()
    for prefix, module in net.named_modules():
        for member in getattr(module, 'prompt_members', ()):
            path = f'{prefix}.{member}' if prefix else member
            obj = getattr(module, member, None)
            if isinstance(obj, nn.Parameter):
                names.add(path)
            elif isinstance(obj, nn.Module):
                names.update(f'{path}.{n}' for n, _ in obj.named_parameters())
    return names


@dataclass
class PromptState:
    """One forward's prompt retrieval: queries ``[B, D]``, pool outputs, composed prompt ``[B, P]``."""
    task_query: torch.Tensor
    task: PoolOutput
    prompt: torch.Tensor
    domain_query: Optional[torch.Tensor] = None
    domain: Optional[PoolOutput] = None


class _PromptComposed(Exception):
    """Ends a forward as soon as its prompt is composed (raised for :meth:`PromptSystem.compute_prompt`)."""


class ConstructorSignature:
    """``cls.__signature__`` of a prompted network: its ``__init__`` with the ``**prompt`` catch-all replaced by the
    class's ``prompt_arguments`` (keyword-only, with their defaults), so ``inspect.signature`` (the option-file check,
    ``help()``) lists every argument the constructor takes. None on an instance, whose call is ``forward``."""

    def __get__(self, obj: Any, cls: type) -> Optional[inspect.Signature]:
        if obj is not None:
            return None
        signature = inspect.signature(cls.__init__)
        own = list(signature.parameters.values())[1:]  # without self
        if not any(p.kind is p.VAR_KEYWORD and p.name == 'prompt' for p in own):
            return None  # not a network constructor taking **prompt: the usual signature
        keyword = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
                   for name, value in cls.prompt_arguments.items()]
        return signature.replace(parameters=[p for p in own if p.kind is not p.VAR_KEYWORD] + keyword)


class PromptSystem(nn.Module):
    """Mixin for networks with a task prompt pool and an optional domain prompt pool.

    Official parameter names are kept: ``degradation_prompt_pool``/``degradation_mapper`` are the task pool and its
    query, ``domain_prompt_pool``/``domain_mapper`` the domain pool and its query, ``prompt_cross_attention``,
    ``prompt_fusion_norm`` and ``prompt_fusion_ffn`` the cross-attention composition.
    """

    #: The constructor's prompt arguments (official names) and their defaults; the network takes them as ``**prompt``.
    prompt_arguments: Mapping[str, Any] = PROMPT_ARGUMENTS
    __signature__ = ConstructorSignature()
    prompt_state: Optional[PromptState] = None
    prompt_members: tuple[str, ...] = ()  # attributes that belong to the prompt system (see prompt_parameter_names)
    prompt_width: Optional[int] = None  # composed prompt width P; None until build_prompt_system (use_prompt=False)
    _fixed_prompt: Optional[torch.Tensor] = None  # set inside fixed_prompt()
    _stop_after_prompt = False  # set inside compute_prompt()

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy``, as an EMA copy is made) leave the last retrieval behind: it holds
        the activations of a forward, which cannot be deep-copied while they are part of an autograd graph."""
        state = super().__getstate__()
        state.pop('prompt_state', None)
        return state

    def configure_prompt(self, prompt: Mapping[str, Any], lean: bool = False,
                         literal: bool = False) -> Optional[PromptConfig]:
        """The validated config of the constructor's ``**prompt`` arguments over this class's ``prompt_arguments``
        (None for ``use_prompt: false``); an argument the class does not take is a ``TypeError``, as in any call."""
        unknown = [name for name in prompt if name not in self.prompt_arguments]
        if unknown:
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument '{unknown[0]}'")
        return PromptConfig.from_arguments({**self.prompt_arguments, **prompt}, lean, literal)

    def build_prompt_system(self, tap_channels: Mapping[str, int], config: PromptConfig,
                            query_grids: Optional[Mapping[str, tuple[int, int]]] = None) -> None:
        """Create the prompt modules of ``config``.

        ``tap_channels``: the channels of the ``domain`` and ``task`` taps (``domain`` only with a domain pool);
        ``query_grids``: each query's pooled grid sizes (default :data:`~.query.QUERY_GRIDS`).
        ``config.domain=None`` gives the task-pool-only system.
        """
        task, domain, tokens = config.task, config.domain, config.value_num_tokens
        grids = {**QUERY_GRIDS, **(query_grids or {})}
        self.composition = config.composition if domain is not None else None
        if domain is not None:
            self.domain_prompt_pool = PromptPool(domain.size, domain.dim, domain.top_k, tokens)
        self.degradation_prompt_pool = PromptPool(task.size, task.dim, task.top_k, tokens)
        if domain is not None:
            self.domain_mapper = PoolQuery(tap_channels['domain'], domain.dim, grids['domain'])
        self.degradation_mapper = PoolQuery(tap_channels['task'], task.dim, grids['task'])
        if self.composition == 'cross_attention':
            self.prompt_cross_attention = SingleKeyAttention(domain.dim, lean=config.lean, literal=config.literal)
            self.prompt_fusion_norm = nn.LayerNorm(domain.dim)
            self.prompt_fusion_ffn = feed_forward(domain.dim)
        self.prompt_members = tuple(name for name in PROMPT_MODULES if hasattr(self, name))
        self.prompt_width = config.width

    @property
    def prompt_taps(self) -> tuple[str, ...]:
        """The taps :meth:`compose_prompt` reads: ``('domain', 'task')``, or ``('task',)`` without a domain pool."""
        return TAPS if self.composition is not None else TAPS[1:]

    def prompt_pools(self) -> 'OrderedDict[str, PromptPool]':
        """The prompt pools by role: ``task``, then ``domain`` where there is one (empty without prompts)."""
        return OrderedDict((role, getattr(self, attr)) for role, attr in
                           (('task', 'degradation_prompt_pool'), ('domain', 'domain_prompt_pool'))
                           if isinstance(getattr(self, attr, None), PromptPool))

    def block_prompt(self, features: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The prompt ``[B, P]`` for the blocks (:meth:`compose_prompt`), or None when the network was built
        without its prompt system (``use_prompt: false``)."""
        return None if self.prompt_width is None else self.compose_prompt(features)

    def compose_prompt(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tapped features ``{'domain': [B, Cd, H, W], 'task': [B, Ct, h, w]}`` -> domain-aware task prompt
        ``[B, P]``.

        Inside :meth:`fixed_prompt` the given prompt is returned (``prompt_state`` is left as it was)."""
        if self._fixed_prompt is not None and not self._stop_after_prompt:
            return self._fixed_prompt.expand(next(iter(features.values())).shape[0], -1)
        prompt = self._retrieve_prompt(features)
        if self._stop_after_prompt:
            raise _PromptComposed
        return prompt

    def _retrieve_prompt(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Queries, both pools and their composition; records ``prompt_state``; returns the prompt ``[B, P]``."""
        task_query = self.degradation_mapper(features['task'])
        task = self.degradation_prompt_pool(task_query)
        if self.composition is None:
            self.prompt_state = PromptState(task_query, task, task.prompt)
            return task.prompt
        domain_query = self.domain_mapper(features['domain'])
        domain = self.domain_prompt_pool(domain_query)
        if self.composition == 'concat':
            prompt = torch.cat([domain.prompt, task.prompt], dim=-1)
        else:
            fused = self.prompt_fusion_norm(domain.prompt + self.prompt_cross_attention(domain.prompt, task.prompt))
            prompt = fused + self.prompt_fusion_ffn(fused)
        self.prompt_state = PromptState(task_query, task, prompt, domain_query, domain)
        return prompt

    def _check_has_prompts(self) -> None:
        if self.prompt_width is None:
            raise ValueError(f'{type(self).__name__} was built without its prompt system (use_prompt: false)')

    def compute_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, H, W]`` -> the prompt ``[B, P]`` that ``forward(x)`` composes, also left in
        ``prompt_state``. The forward stops right after the retrieval: the rest of the network is not run."""
        self._check_has_prompts()
        self._stop_after_prompt = True
        try:
            self(x)
        except _PromptComposed:
            return self.prompt_state.prompt
        finally:
            self._stop_after_prompt = False
        raise RuntimeError(f'{type(self).__name__}.forward never called compose_prompt')

    @contextmanager
    def fixed_prompt(self, prompt: torch.Tensor) -> Iterator[PromptSystem]:
        """Within the block every forward uses ``prompt`` ``[1, P]`` (shared by the batch) or ``[B, P]`` instead of
        retrieving one from its own input, e.g. each tile of an image under the whole image's prompt
        (from :meth:`compute_prompt`). For inference: ``prompt_state`` is not updated, so no prompt-pool loss sees
        these forwards."""
        self._check_has_prompts()
        if prompt.ndim != 2 or prompt.shape[1] != self.prompt_width:
            raise ValueError(f'a fixed prompt must have shape [B, {self.prompt_width}], got {list(prompt.shape)}')
        previous, self._fixed_prompt = self._fixed_prompt, prompt
        try:
            yield self
        finally:
            self._fixed_prompt = previous
