"""DATPRL on a NAFNet backbone (registered as DualPromptNAFNetv3): NAF blocks with gated prompt fusion after
their first norm, the same prompt system as the Restormer variant, zero padding to a multiple of 2^levels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY

from ..utils.registry import register
from .padding import check_pad_mode, check_pad_multiple, pad_to_multiple
from .prompt import PROMPT_ARGUMENTS, BlockStack, PromptConfig, PromptedBlock, PromptSystem

NAF_NORM_EPS = 1e-6
#: The official DualPromptNAFNetv3 defaults of the prompt arguments (the pools differ from the Restormer network's).
NAF_PROMPT_ARGUMENTS = dict(PROMPT_ARGUMENTS, domain_pool_size=6, degradation_pool_size=12, domain_top_k=3,
                            value_num_tokens=5)


class NAFLayerNorm(nn.Module):
    """Layer norm over the channels of ``[B, C, H, W]`` (eps 1e-6), keys ``weight``/``bias``."""

    def __init__(self, dim: int, literal: bool = False):
        super().__init__()
        self.literal = literal
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.literal:  # the official per-channel statistics on the map
            mean = x.mean(1, keepdim=True)
            var = (x - mean).pow(2).mean(1, keepdim=True)
            return self.weight[:, None, None] * (x - mean) / (var + NAF_NORM_EPS).sqrt() + self.bias[:, None, None]
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias,
                            NAF_NORM_EPS).permute(0, 3, 1, 2)


def simple_gate(x: torch.Tensor) -> torch.Tensor:
    """Product of the two channel halves: ``[B, 2C, H, W] -> [B, C, H, W]``."""
    x1, x2 = x.chunk(2, dim=1)
    return x1 * x2


class NAFBlock(PromptedBlock):
    """NAFNet block; with a prompt configuration, the prompt is fused into the normalised input of the first branch."""

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0,
                 literal: bool = False, prompt: Optional[PromptConfig] = None):
        super().__init__()
        dw, ffn = c * dw_expand, c * ffn_expand
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = NAFLayerNorm(c, literal)
        self.norm2 = NAFLayerNorm(c, literal)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.build_fusion(c, prompt)

    def forward(self, inp: torch.Tensor, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = simple_gate(self.conv2(self.conv1(self.fuse(self.norm1(inp), prompt))))
        y = inp + self.dropout1(self.conv3(x * self.sca(x))) * self.beta
        x = self.conv5(simple_gate(self.conv4(self.norm2(y))))
        return y + self.dropout2(x) * self.gamma


@register(ARCH_REGISTRY, aliases=('DualPromptNAFNetv3',))
class DATPRLNAFNet(PromptSystem):
    """DATPRL with a NAFNet backbone: plain NAF encoder, prompted middle and decoder blocks, additive skips.

    Args (official names; ``degradation`` = task): img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums
    as in NAFNet; ``lean``, ``literal``, ``pad_mode`` and ``pad_multiple`` (default ``2**len(enc_blk_nums)``) and the
    prompt arguments (``**prompt``, with the official NAFNet defaults of :data:`NAF_PROMPT_ARGUMENTS`; among them
    ``use_domain_pool: false`` for the task pool only) as in ``DATPRLRestormer``.
    """

    prompt_arguments = NAF_PROMPT_ARGUMENTS

    def __init__(self, img_channel: int = 3, width: int = 32, middle_blk_num: int = 12,
                 enc_blk_nums: Sequence[int] = (2, 2, 4, 8), dec_blk_nums: Sequence[int] = (2, 2, 2, 2),
                 lean: bool = False, literal: bool = False, pad_mode: str = 'constant',
                 pad_multiple: Optional[int] = None, **prompt):
        super().__init__()
        config = self.configure_prompt(prompt, lean, literal)  # validated before any layer is built
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(f'enc_blk_nums {list(enc_blk_nums)} and dec_blk_nums {list(dec_blk_nums)} '
                             'must have one entry per level')
        self.pad_mode = check_pad_mode(pad_mode)
        self.pad_multiple = check_pad_multiple(pad_multiple or 2**len(enc_blk_nums), 2**len(enc_blk_nums))

        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.decoders, self.middle_blks = nn.ModuleList(), nn.ModuleList(), BlockStack()
        self.ups, self.downs = nn.ModuleList(), nn.ModuleList()  # registered in this order: the official key order
        chan = width
        for num in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan, literal=literal) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks.extend(NAFBlock(chan, literal=literal, prompt=config) for _ in range(middle_blk_num))
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(BlockStack(NAFBlock(chan, literal=literal, prompt=config) for _ in range(num)))
        if config is not None:
            self.build_prompt_system({'domain': width, 'task': width * 2**len(enc_blk_nums)}, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, C, H, W]`` -> restored ``[B, C, H, W]`` for any H, W."""
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        y = stem = self.intro(padded)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            y = encoder(y)
            skips.append(y)
            y = down(y)
        prompt = self.block_prompt({'domain': stem, 'task': y})
        y = self.middle_blks(y, prompt)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            y = decoder(up(y) + skip, prompt)
        return (self.ending(y) + padded)[..., :h, :w]
