"""Prompt modes of :class:`~datprl_arch.archs.prompted_backbone_arch.PromptedBackbone` (``prompt: {type: ...}``):
the related methods' prompts on any backbone, next to DATPRL's dual pools (the default).

- ``ExplicitPrompt``, ``AdaptivePrompt``: MiO IR (:mod:`.mio`);
- ``LowRankPrompt``: TAP (:mod:`.low_rank`);
- ``DistributionPrompt``: DPPD (:mod:`.distribution`).
"""
from . import distribution, low_rank, mio  # noqa: F401  (registration)
from .base import INPUT_TAP, PROMPT_MODES, ModeState, PromptMode, register_mode

__all__ = ['INPUT_TAP', 'PROMPT_MODES', 'ModeState', 'PromptMode', 'register_mode']
