"""DATPRL networks on the Restormer backbone: domain-aware task prompt learning (ICLR 2026).

The domain query reads the stem features, the task query the deepest encoder features; the composed prompt is
injected through gated fusion into every latent, decoder and refinement block (never the encoder). The U-Net and its
forward are the plain Restormer's (``restormer_arch.RestormerUNet``). Constructor arguments keep the official names
(``degradation_*`` is the task pool) so official option files work unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY

from ..utils.registry import register
from .padding import check_pad_mode, check_pad_multiple
from .prompt import TASK_POOL_ARGUMENTS, PromptSystem, set_checkpointing
from .restormer_arch import RESTORMER_PAD, PatchEmbed, RestormerUNet

DEFAULT_DIM = 48


@register(ARCH_REGISTRY, aliases=('DualPromptRestormerv3',))
class DATPRLRestormer(PromptSystem, RestormerUNet):
    """DATPRL-IR: Restormer with a task prompt pool and a domain prompt pool (registered as DualPromptRestormerv3).

    Args (official names; ``degradation`` = task):
        img_channel: input/output channels.
        dim / width: level-1 channels (48 when both are None).
        enc_blk_nums: blocks of encoder levels 1..3. middle_blk_num: latent blocks. refine_blk_num: refinement blocks.
        dec_blk_nums: decoder blocks, applied mirrored as in the official code (level 3 gets ``[2]``, level 1 ``[0]``).
        heads: attention heads of levels 1..4. ffn_expansion_factor, bias, LayerNorm_type: as in Restormer.
        lean: do not allocate the parameters that cannot affect the output (9.1M in the 6-task model); official
            checkpoints still load (the dead weights are dropped). For new training.
        literal: compute exactly as the official code (per-pixel fusion, token-reshaping norms): a benchmark baseline.
        use_checkpoint: gradient checkpointing of every transformer block (the name SwinIR uses): activations are
            recomputed in the backward pass instead of stored, for full-size crops at large batches; same results.
        pad_mode: padding to ``pad_multiple``, 'constant' (official, zeros), 'reflect' or 'replicate'.
        pad_multiple: the input is padded to a multiple of this (8, as the official network; the official natural
            3-/5-task test reflect-pads to 32).
        **prompt: the prompt arguments of ``prompt.PROMPT_ARGUMENTS`` (keyword-only, in the signature):
            use_prompt (False: the prompt-free backbone with the same keys), domain_/degradation_pool_size,
            _prompt_dim, _top_k (the two pools), value_num_tokens (tokens per value), prompt_fusion_method
            (composition of the two prompts, 'cross_attention' or 'concat'), fusion_method (gated fusion in the
            blocks, 'cross_attention', 'concat' or 'adaptive_modulation'), use_domain_pool (False: task pool only).
    """

    latent_name = 'latent_blocks'

    def __init__(self, img_channel: int = 3, dim: Optional[int] = None, width: Optional[int] = None,
                 enc_blk_nums: Sequence[int] = (4, 6, 6), middle_blk_num: int = 8,
                 dec_blk_nums: Sequence[int] = (6, 6, 4), refine_blk_num: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = 'WithBias', lean: bool = False, literal: bool = False,  # noqa: N803
                 pad_mode: str = 'constant', pad_multiple: int = RESTORMER_PAD, use_checkpoint: bool = False,
                 **prompt):
        super().__init__()
        config = self.configure_prompt(prompt, lean, literal)  # validated before any layer is built
        self.pad_mode = check_pad_mode(pad_mode)
        self.pad_multiple = check_pad_multiple(pad_multiple, RESTORMER_PAD)
        c = dim or width or DEFAULT_DIM
        blocks = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm_type=LayerNorm_type,
                      literal=literal)
        self.patch_embed = PatchEmbed(img_channel, c)
        self.output = nn.Conv2d(c * 2, img_channel, 3, padding=1, bias=bias)
        self.build_encoder(c, enc_blk_nums, heads, **blocks)
        self.build_decoder(c, middle_blk_num, dec_blk_nums, refine_blk_num, heads, config, **blocks)
        if config is not None:
            self.build_prompt_system({'domain': c, 'task': c * 8}, config)
        set_checkpointing(self, use_checkpoint)


@register(ARCH_REGISTRY, aliases=('DualPromptRestormerv3_only_task_prompt',))
class DATPRLRestormerTaskPool(DATPRLRestormer):
    """DATPRL with the task prompt pool only (CDD11 and natural 3-/5-task checkpoints); the task prompt goes
    straight to the blocks. Registered as DualPromptRestormerv3_only_task_prompt; it takes the backbone arguments
    and the task pool's (``prompt.TASK_POOL_ARGUMENTS``) with their official defaults, and no domain arguments."""

    prompt_arguments = TASK_POOL_ARGUMENTS
