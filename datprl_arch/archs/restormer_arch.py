"""Restormer building blocks and the plain (zero-padded) Restormer.

Blocks keep the official parameter names (``norm1.body.weight``, ``attn.qkv`` ...) so Restormer and DATPRL
checkpoints load unchanged. The layer norm works on the channel axis directly instead of reshaping the map to
tokens and back (``literal=True`` keeps the official reshaping computation for the benchmark baseline).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY

from ..utils.registry import register
from .padding import pad_to_multiple
from .prompt import PromptedBlock

NORM_EPS = 1e-5
LAYER_NORM_TYPES = ('WithBias', 'BiasFree')
RESTORMER_PAD = 8  # three 2x downsamplings


class _NormAffine(nn.Module):
    """Holds the norm's per-channel ``weight`` (and ``bias``); the official key is ``<norm>.body.weight``."""

    def __init__(self, dim: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of ``[B, C, H, W]`` with biased variance and eps 1e-5.

    ``WithBias``: ``(x - mean) / std * w + b``; ``BiasFree``: ``x / std * w`` (std still of the centred values).
    """

    def __init__(self, dim: int, layer_norm_type: str = 'WithBias', literal: bool = False):
        super().__init__()
        if layer_norm_type not in LAYER_NORM_TYPES:
            raise ValueError(f"LayerNorm_type must be one of {LAYER_NORM_TYPES}, got '{layer_norm_type}'")
        self.bias_free = layer_norm_type == 'BiasFree'
        self.literal = literal
        self.body = _NormAffine(dim, with_bias=not self.bias_free)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.literal:
            return self._literal(x)
        if self.bias_free:
            var = x.var(dim=1, unbiased=False, keepdim=True)
            return x * torch.rsqrt(var + NORM_EPS) * self.body.weight[:, None, None]
        channels_last = x.permute(0, 2, 3, 1)
        # torch.compile needs dynamic=False here: with dynamic shapes (a second input size after padding to
        # RESTORMER_PAD), Inductor's stride-order test on this permute back fails ("cannot determine truth value of
        # Relational: 8*s0*s53 < 8", CPU Inductor, torch 2.14.1); bench and DATPRLModel compile static shapes.
        return F.layer_norm(channels_last, (x.shape[1],), self.body.weight, self.body.bias, NORM_EPS).permute(0, 3, 1, 2)

    def _literal(self, x):
        """Official computation: tokens ``[B, HW, C]``, hand-written mean/variance, back to a map."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        mean = tokens.mean(-1, keepdim=True)
        var = tokens.var(-1, keepdim=True, unbiased=False)
        if self.bias_free:
            out = tokens / torch.sqrt(var + NORM_EPS) * self.body.weight
        else:
            out = (tokens - mean) / torch.sqrt(var + NORM_EPS) * self.body.weight + self.body.bias
        return out.transpose(1, 2).reshape(b, c, h, w)


class ChannelAttention(nn.Module):
    """MDTA: multi-head attention across channels (a ``C/h x C/h`` map per head), linear in the pixel count."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'{dim} channels cannot be split into {num_heads} attention heads')
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class GatedFeedForward(nn.Module):
    """GDFN: ``project_out(GELU(z1) * z2)`` with ``[z1 ; z2] = dwconv(project_in(x))``."""

    def __init__(self, dim: int, expansion: float = 2.66, bias: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(z1) * z2)


class TransformerBlock(PromptedBlock):
    """Restormer block ``x + attn(norm1(fuse(x, c)))`` then ``x + ffn(norm2(x))``.

    With ``prompt_dim`` set the block takes a prompt through gated fusion (the prompt reaches only the attention
    input, as in DATPRL); without it, it is the plain Restormer block and ``forward(x)`` needs no prompt.
    """

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layer_norm_type: str = 'WithBias', prompt_dim: Optional[int] = None,
                 fusion_method: str = 'cross_attention', lean: bool = False, literal: bool = False):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, layer_norm_type, literal)
        self.attn = ChannelAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, layer_norm_type, literal)
        self.ffn = GatedFeedForward(dim, ffn_expansion_factor, bias)
        self.build_fusion(dim, prompt_dim, fusion_method, lean, literal)

    def forward(self, x: torch.Tensor, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(self.fuse(x, prompt)))
        return x + self.ffn(self.norm2(x))


class PatchEmbed(nn.Module):
    """3x3 convolution from the image to ``dim`` channels (never biased, as in the official code)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """C -> 2C channels at half resolution: 3x3 conv to C/2, then pixel-unshuffle by 2."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """C -> C/2 channels at double resolution: 3x3 conv to 2C, then pixel-shuffle by 2."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


def transformer_stack(count: int, dim: int, heads: int, **block_args) -> nn.Sequential:
    """``count`` plain transformer blocks (an encoder level)."""
    return nn.Sequential(*[TransformerBlock(dim, heads, **block_args) for _ in range(count)])


class RestormerEncoder(nn.Module):
    """Mixin: the Restormer encoder, three levels of plain blocks each followed by a 2x downsampling. Registered on
    the host with the official names (``encoder_level1``, ``down1_2``, ...) so the plain and the prompted U-Net keep
    their checkpoint keys."""

    def build_encoder(self, dim: int, blocks: Sequence[int], heads: Sequence[int], **block_args) -> None:
        """Levels at ``dim``, ``2 dim``, ``4 dim`` channels with ``blocks[i]`` blocks of ``heads[i]`` heads."""
        self.encoder_level1 = transformer_stack(blocks[0], dim, heads[0], **block_args)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = transformer_stack(blocks[1], dim * 2, heads[1], **block_args)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = transformer_stack(blocks[2], dim * 4, heads[2], **block_args)
        self.down3_4 = Downsample(dim * 4)

    def encode(self, stem: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """stem ``[B, C, H, W]`` -> the three levels' outputs (skips) and the deepest features ``[B, 8C, H/8, W/8]``."""
        out1 = self.encoder_level1(stem)
        out2 = self.encoder_level2(self.down1_2(out1))
        out3 = self.encoder_level3(self.down2_3(out2))
        return (out1, out2, out3), self.down3_4(out3)


@register(ARCH_REGISTRY, aliases=('Restormer',))
class PaddedRestormer(RestormerEncoder):
    """Restormer (Zamir et al. 2022) that zero-pads the input to a multiple of 8 and crops the output.

    Registered as ``Restormer`` with the official arguments, so DATPRL-IR's prompt-free option files and checkpoints
    work. ``dual_pixel_task`` adds a skip convolution at level 1 and drops the global residual.
    """

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = 'WithBias', dual_pixel_task: bool = False, literal: bool = False):  # noqa: N803
        super().__init__()
        args = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm_type=LayerNorm_type,
                    literal=literal)
        self.dual_pixel_task = dual_pixel_task
        self.patch_embed = PatchEmbed(inp_channels, dim)
        self.build_encoder(dim, num_blocks[:3], heads, **args)
        self.latent = transformer_stack(num_blocks[3], dim * 8, heads[3], **args)
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = transformer_stack(num_blocks[2], dim * 4, heads[2], **args)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = transformer_stack(num_blocks[1], dim * 2, heads[1], **args)
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = transformer_stack(num_blocks[0], dim * 2, heads[0], **args)
        self.refinement = transformer_stack(num_refinement_blocks, dim * 2, heads[0], **args)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, 1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, C_in, H, W]`` -> ``[B, C_out, H, W]`` for any H, W."""
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, RESTORMER_PAD)
        stem = self.patch_embed(padded)
        (out1, out2, out3), deep = self.encode(stem)
        y = self.latent(deep)
        y = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(y), out3], 1)))
        y = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(y), out2], 1)))
        y = self.refinement(self.decoder_level1(torch.cat([self.up2_1(y), out1], 1)))
        if self.dual_pixel_task:
            y = self.output(y + self.skip_conv(stem))
        else:
            y = self.output(y) + padded
        return y[..., :h, :w]
