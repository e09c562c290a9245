"""The prompt configuration of a network: one frozen description, validated before any layer is built.

A prompted network takes its prompt arguments (official names, :data:`PROMPT_ARGUMENTS`) as ``**prompt`` and turns
them into a :class:`PromptConfig` first thing in its constructor (``PromptSystem.configure_prompt``): a bad pool size,
composition or fusion fails there, naming the argument, before the backbone is built. The blocks and the prompt
system are then built from the config, and the composed prompt's width is computed in one place
(:attr:`PromptConfig.width`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .compose import check_composition
from .fusion import check_fusion
from .pool import PoolSpec, check_value_tokens

#: Prompt arguments of the task-pool-only network (official names), with the official defaults.
TASK_POOL_ARGUMENTS = MappingProxyType(dict(
    use_prompt=True, degradation_pool_size=15, degradation_prompt_dim=1024, degradation_top_k=3, value_num_tokens=2,
    fusion_method='cross_attention'))
#: Prompt arguments of a network with both pools, with the official 6-task Restormer defaults; ``use_domain_pool:
#: false`` gives the task-pool-only system (the domain arguments are then unused).
PROMPT_ARGUMENTS = MappingProxyType(dict(
    use_prompt=True, domain_pool_size=15, degradation_pool_size=15, domain_prompt_dim=1024,
    degradation_prompt_dim=1024, domain_top_k=5, degradation_top_k=3, value_num_tokens=2,
    prompt_fusion_method='cross_attention', fusion_method='cross_attention', use_domain_pool=True))


@dataclass(frozen=True)
class PromptConfig:
    """What a network's prompt system is; invalid values raise ``ValueError`` on construction.

    task: the task pool (official ``degradation_*``). domain: the domain pool, None for the task-pool-only system.
    value_num_tokens: value tokens T per prompt. composition: how the two pools' prompts become one,
    ``cross_attention`` or ``concat`` (unused without a domain pool). fusion: the gated fusion in every prompted
    block, ``cross_attention``, ``concat`` or ``adaptive_modulation``. lean, literal: see ``DATPRLRestormer``.
    """
    task: PoolSpec
    domain: Optional[PoolSpec]
    value_num_tokens: int
    composition: str = 'cross_attention'
    fusion: str = 'cross_attention'
    lean: bool = False
    literal: bool = False

    def __post_init__(self):
        self.task.check('degradation_')
        if self.domain is not None:
            self.domain.check('domain_')
            check_composition(self.composition, self.domain.dim, self.task.dim)
        check_value_tokens(self.value_num_tokens)
        check_fusion(self.fusion)
        if self.lean and self.literal:
            raise ValueError('lean=True drops the projections that literal=True computes; choose one')

    @property
    def width(self) -> int:
        """Width P of the composed prompt ``[B, P]`` that the prompted blocks receive."""
        if self.domain is None:
            return self.task.dim
        return self.domain.dim if self.composition == 'cross_attention' else self.domain.dim + self.task.dim

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], lean: bool = False,
                       literal: bool = False) -> Optional[PromptConfig]:
        """The config of a network's complete prompt arguments (official names, as in :data:`PROMPT_ARGUMENTS`;
        without ``use_domain_pool``: task pool only); None for ``use_prompt: false`` (the prompt-free backbone)."""
        if not arguments['use_prompt']:
            return None
        task = PoolSpec(arguments['degradation_pool_size'], arguments['degradation_prompt_dim'],
                        arguments['degradation_top_k'])
        domain = (PoolSpec(arguments['domain_pool_size'], arguments['domain_prompt_dim'], arguments['domain_top_k'])
                  if arguments.get('use_domain_pool') else None)
        return cls(task, domain, arguments['value_num_tokens'],
                   arguments.get('prompt_fusion_method', PROMPT_ARGUMENTS['prompt_fusion_method']),
                   arguments['fusion_method'], lean, literal)
