"""DATPRL networks on the Restormer backbone: domain-aware task prompt learning (ICLR 2026).

The domain query reads the stem features, the task query the deepest encoder features; the composed prompt is
injected through gated fusion into every latent, decoder and refinement block (never the encoder). Constructor
arguments keep the official names (``degradation_*`` is the task pool) so official option files work unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY

from ..utils.registry import register
from .padding import check_pad_mode, check_pad_multiple, pad_to_multiple
from .prompt import PoolSpec, PromptSystem
from .prompt.compose import composed_dim
from .restormer_arch import RESTORMER_PAD, PatchEmbed, RestormerEncoder, TransformerBlock, Upsample

DEFAULT_DIM = 48


def prompted_stack(count: int, dim: int, heads: int, **block_args) -> nn.ModuleList:
    """``count`` transformer blocks that each take the prompt."""
    return nn.ModuleList([TransformerBlock(dim, heads, **block_args) for _ in range(count)])


@register(ARCH_REGISTRY, aliases=('DualPromptRestormerv3',))
class DATPRLRestormer(PromptSystem, RestormerEncoder):
    """DATPRL-IR: Restormer with a task prompt pool and a domain prompt pool (registered as DualPromptRestormerv3).

    Args (official names; ``degradation`` = task):
        img_channel: input/output channels.
        dim / width: level-1 channels (48 when both are None).
        enc_blk_nums: blocks of encoder levels 1..3. middle_blk_num: latent blocks. refine_blk_num: refinement blocks.
        dec_blk_nums: decoder blocks, applied mirrored as in the official code (level 3 gets ``[2]``, level 1 ``[0]``).
        heads: attention heads of levels 1..4. ffn_expansion_factor, bias, LayerNorm_type: as in Restormer.
        use_prompt: False gives the prompt-free backbone with the same keys.
        domain_/degradation_pool_size, _prompt_dim, _top_k: the two pools; value_num_tokens: tokens per value.
        prompt_fusion_method: composition of the two prompts, 'cross_attention' or 'concat'.
        fusion_method: gated fusion in the blocks, 'cross_attention', 'concat' or 'adaptive_modulation'.
        lean: do not allocate the parameters that cannot affect the output (9.1M in the 6-task model); official
            checkpoints still load (the dead weights are dropped). For new training.
        literal: compute exactly as the official code (per-pixel fusion, token-reshaping norms): a benchmark baseline.
        pad_mode: padding to ``pad_multiple``, 'constant' (official, zeros), 'reflect' or 'replicate'.
        pad_multiple: the input is padded to a multiple of this (8, as the official network; the official natural
            3-/5-task test reflect-pads to 32).
        use_domain_pool: False gives the task-pool-only network.
    """

    def __init__(self, img_channel: int = 3, dim: Optional[int] = None, width: Optional[int] = None,
                 enc_blk_nums: Sequence[int] = (4, 6, 6), middle_blk_num: int = 8,
                 dec_blk_nums: Sequence[int] = (6, 6, 4), refine_blk_num: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = 'WithBias', use_prompt: bool = True,  # noqa: N803
                 domain_pool_size: int = 15, degradation_pool_size: int = 15,
                 domain_prompt_dim: int = 1024, degradation_prompt_dim: int = 1024,
                 domain_top_k: int = 5, degradation_top_k: int = 3, value_num_tokens: int = 2,
                 prompt_fusion_method: str = 'cross_attention', fusion_method: str = 'cross_attention',
                 lean: bool = False, literal: bool = False, pad_mode: str = 'constant',
                 pad_multiple: int = RESTORMER_PAD, use_domain_pool: bool = True):
        super().__init__()
        c = dim or width or DEFAULT_DIM
        self.use_prompt, self.pad_mode = use_prompt, check_pad_mode(pad_mode)
        self.pad_multiple = check_pad_multiple(pad_multiple, RESTORMER_PAD)
        task = PoolSpec(degradation_pool_size, degradation_prompt_dim, degradation_top_k)
        domain = PoolSpec(domain_pool_size, domain_prompt_dim, domain_top_k) if use_domain_pool else None
        if not use_prompt:
            prompt_dim = None
        elif domain is None:
            prompt_dim = task.dim
        else:
            prompt_dim = composed_dim(domain.dim, task.dim, prompt_fusion_method)
        plain = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm_type=LayerNorm_type,
                     literal=literal)
        prompted = dict(plain, prompt_dim=prompt_dim, fusion_method=fusion_method, lean=lean)

        self.patch_embed = PatchEmbed(img_channel, c)
        self.output = nn.Conv2d(c * 2, img_channel, 3, padding=1, bias=bias)
        self.build_encoder(c, enc_blk_nums, heads, **plain)
        self.latent_blocks = prompted_stack(middle_blk_num, c * 8, heads[3], **prompted)
        self.up4_3 = Upsample(c * 8)
        self.reduce_chan_level3 = nn.Conv2d(c * 8, c * 4, 1, bias=bias)
        self.decoder_level3 = prompted_stack(dec_blk_nums[2], c * 4, heads[2], **prompted)
        self.up3_2 = Upsample(c * 4)
        self.reduce_chan_level2 = nn.Conv2d(c * 4, c * 2, 1, bias=bias)
        self.decoder_level2 = prompted_stack(dec_blk_nums[1], c * 2, heads[1], **prompted)
        self.up2_1 = Upsample(c * 2)
        self.decoder_level1 = prompted_stack(dec_blk_nums[0], c * 2, heads[0], **prompted)
        self.refinement = prompted_stack(refine_blk_num, c * 2, heads[0], **prompted)
        if use_prompt:
            self.build_prompt_system(c, c * 8, task, domain, value_num_tokens, prompt_fusion_method, lean, literal)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor, prompt: Optional[torch.Tensor]) -> torch.Tensor:
        for block in blocks:
            x = block(x, prompt)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, C, H, W]`` -> restored ``[B, C, H, W]`` for any H, W (padded internally to a multiple of 8)."""
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        stem = self.patch_embed(padded)
        (out1, out2, out3), deep = self.encode(stem)
        prompt = self.compose_prompt(stem, deep) if self.use_prompt else None
        y = self._run(self.latent_blocks, deep, prompt)
        y = self._run(self.decoder_level3, self.reduce_chan_level3(torch.cat([self.up4_3(y), out3], 1)), prompt)
        y = self._run(self.decoder_level2, self.reduce_chan_level2(torch.cat([self.up3_2(y), out2], 1)), prompt)
        y = self._run(self.decoder_level1, torch.cat([self.up2_1(y), out1], 1), prompt)
        y = self._run(self.refinement, y, prompt)
        return (self.output(y) + padded)[..., :h, :w]


@register(ARCH_REGISTRY, aliases=('DualPromptRestormerv3_only_task_prompt',))
class DATPRLRestormerTaskPool(DATPRLRestormer):
    """DATPRL with the task prompt pool only (CDD11 and natural 3-/5-task checkpoints); the task prompt goes
    straight to the blocks. Registered as DualPromptRestormerv3_only_task_prompt with its official defaults."""

    def __init__(self, img_channel: int = 3, dim: Optional[int] = None, width: Optional[int] = None,
                 enc_blk_nums: Sequence[int] = (4, 6, 6), middle_blk_num: int = 8,
                 dec_blk_nums: Sequence[int] = (6, 6, 4), refine_blk_num: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = 'WithBias', use_prompt: bool = True,  # noqa: N803
                 degradation_pool_size: int = 15, degradation_prompt_dim: int = 1024, degradation_top_k: int = 3,
                 value_num_tokens: int = 2, fusion_method: str = 'cross_attention',
                 lean: bool = False, literal: bool = False, pad_mode: str = 'constant',
                 pad_multiple: int = RESTORMER_PAD):
        super().__init__(img_channel, dim, width, enc_blk_nums, middle_blk_num, dec_blk_nums, refine_blk_num, heads,
                         ffn_expansion_factor, bias, LayerNorm_type, use_prompt,
                         degradation_pool_size=degradation_pool_size, degradation_prompt_dim=degradation_prompt_dim,
                         degradation_top_k=degradation_top_k, value_num_tokens=value_num_tokens,
                         fusion_method=fusion_method, lean=lean, literal=literal, pad_mode=pad_mode,
                         pad_multiple=pad_multiple, use_domain_pool=False)
