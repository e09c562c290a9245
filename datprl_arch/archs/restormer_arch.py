"""Restormer building blocks, the Restormer U-Net shared by the plain and the prompted network, and the plain
(zero-padded) Restormer.

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
from .prompt import BlockStack, PromptConfig, PromptedBlock, set_checkpointing

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
        normed = F.layer_norm(channels_last, (x.shape[1],), self.body.weight, self.body.bias, NORM_EPS)
        return normed.permute(0, 3, 1, 2)

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
        qkv = self.qkv_dwconv(self.qkv(x))
        if self.num_heads == 1 and qkv.is_contiguous(memory_format=torch.channels_last):
            return self.project_out(self._single_head_tokens(qkv))
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))

    def _single_head_tokens(self, qkv: torch.Tensor) -> torch.Tensor:
        """The one-head attention of a channels-last ``qkv`` ``[B, 3C, H, W]`` on its ``[B, HW, C]`` token views,
        returned channels-last ``[B, C, H, W]``: the same products as ``forward`` without the two layout copies its
        reshapes cost in that layout (the CPU runs channels-last, ``utils.precision.memory_format``)."""
        b, _, h, w = qkv.shape
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3, -1).unbind(2)
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        attn = (q.transpose(1, 2) @ k * self.temperature).softmax(dim=-1)  # [B, C, C]
        return (v @ attn.transpose(1, 2)).view(b, h, w, -1).permute(0, 3, 1, 2)


class GatedFeedForward(nn.Module):
    """GDFN: ``project_out(GELU(z1) * z2)`` with ``[z1 ; z2] = dwconv(project_in(x))``.

    The two halves ``z1``, ``z2`` ``[B, hidden, H, W]`` are computed by two convolutions over the halves of the
    official weights (which stay single parameters, so checkpoints load unchanged) instead of one convolution split
    by ``chunk``: the backward then never concatenates the halves' gradients into a ``[B, 2 hidden, H, W]`` map in
    the channels-last layout the layer norm hands on, a copy that cost as much as the depthwise convolution itself
    on the CPU (docs/benchmarks.md). ``literal=True`` keeps the official ``chunk`` computation.
    """

    def __init__(self, dim: int, expansion: float = 2.66, bias: bool = False, literal: bool = False):
        super().__init__()
        self.hidden = int(dim * expansion)
        self.literal = literal
        self.project_in = nn.Conv2d(dim, 2 * self.hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * self.hidden, 2 * self.hidden, 3, padding=1, groups=2 * self.hidden, bias=bias)
        self.project_out = nn.Conv2d(self.hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.literal:
            z1, z2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        else:
            z1, z2 = self._half(x, 0), self._half(x, 1)
        return self.project_out(F.gelu(z1) * z2)

    def _half(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """``dwconv(project_in(x))`` restricted to the output channels of half ``index``: ``[B, hidden, H, W]``."""
        half = slice(index * self.hidden, (index + 1) * self.hidden)
        y = F.conv2d(x, self.project_in.weight[half], _sliced(self.project_in.bias, half))
        return F.conv2d(y, self.dwconv.weight[half], _sliced(self.dwconv.bias, half), padding=1, groups=self.hidden)


def _sliced(bias: Optional[torch.Tensor], part: slice) -> Optional[torch.Tensor]:
    return None if bias is None else bias[part]


class TransformerBlock(PromptedBlock):
    """Restormer block ``x + attn(norm1(fuse(x, c)))`` then ``x + ffn(norm2(x))``.

    With a prompt configuration the block takes a prompt through gated fusion (the prompt reaches only the attention
    input, as in DATPRL); without it, it is the plain Restormer block and ``forward(x)`` needs no prompt.
    """

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layer_norm_type: str = 'WithBias', literal: bool = False, prompt: Optional[PromptConfig] = None):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, layer_norm_type, literal)
        self.attn = ChannelAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, layer_norm_type, literal)
        self.ffn = GatedFeedForward(dim, ffn_expansion_factor, bias, literal)
        self.build_fusion(dim, prompt)

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


def transformer_stack(count: int, dim: int, heads: int, prompt: Optional[PromptConfig] = None,
                      **block_args) -> BlockStack:
    """``count`` transformer blocks, prompted by ``prompt`` when it is given."""
    return BlockStack(TransformerBlock(dim, heads, prompt=prompt, **block_args) for _ in range(count))


class RestormerUNet(nn.Module):
    """Mixin: the Restormer U-Net and its forward, shared by the plain Restormer and the DATPRL networks.

    The host registers ``patch_embed`` and ``output`` itself (their places in the state_dict differ between the
    official networks), then calls :meth:`build_encoder` and :meth:`build_decoder`, which register the official names
    (``encoder_level1``, ``down1_2``, ..., the latent stack as :attr:`latent_name`, ``up4_3``, ...,
    ``refinement``). ``forward`` pads to :attr:`pad_multiple`, encodes, asks :meth:`block_prompt` for the prompt of the
    latent, decoder and refinement blocks (None here: the plain network), decodes, adds the input back
    (:meth:`project_out`) and crops.
    """

    #: Attribute of the latent blocks: ``latent`` in Restormer checkpoints, ``latent_blocks`` in DATPRL ones.
    latent_name = 'latent'
    pad_multiple = RESTORMER_PAD
    pad_mode = 'constant'

    def build_encoder(self, dim: int, blocks: Sequence[int], heads: Sequence[int], **block_args) -> None:
        """Levels at ``dim``, ``2 dim``, ``4 dim`` channels with ``blocks[i]`` plain blocks of ``heads[i]`` heads, each
        followed by a 2x downsampling."""
        self.encoder_level1 = transformer_stack(blocks[0], dim, heads[0], **block_args)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = transformer_stack(blocks[1], dim * 2, heads[1], **block_args)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = transformer_stack(blocks[2], dim * 4, heads[2], **block_args)
        self.down3_4 = Downsample(dim * 4)

    def build_decoder(self, dim: int, latent_blocks: int, blocks: Sequence[int], refine_blocks: int,
                      heads: Sequence[int], prompt: Optional[PromptConfig] = None, **block_args) -> None:
        """Latent at ``8 dim``, decoder levels 3, 2, 1 with ``blocks[2]``, ``blocks[1]``, ``blocks[0]`` blocks (the
        official mirrored order), refinement at ``2 dim``; every block is prompted by ``prompt`` when it is given."""
        bias = block_args.get('bias', False)
        setattr(self, self.latent_name, transformer_stack(latent_blocks, dim * 8, heads[3], prompt, **block_args))
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = transformer_stack(blocks[2], dim * 4, heads[2], prompt, **block_args)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = transformer_stack(blocks[1], dim * 2, heads[1], prompt, **block_args)
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = transformer_stack(blocks[0], dim * 2, heads[0], prompt, **block_args)
        self.refinement = transformer_stack(refine_blocks, dim * 2, heads[0], prompt, **block_args)

    def encode(self, stem: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """stem ``[B, C, H, W]`` -> the three levels' outputs (skips) and the deepest features ``[B, 8C, H/8, W/8]``."""
        out1 = self.encoder_level1(stem)
        out2 = self.encoder_level2(self.down1_2(out1))
        out3 = self.encoder_level3(self.down2_3(out2))
        return (out1, out2, out3), self.down3_4(out3)

    def decode(self, deep: torch.Tensor, skips: Sequence[torch.Tensor],
               prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """deep ``[B, 8C, H/8, W/8]``, skips of :meth:`encode`, prompt ``[B, P]`` or None -> ``[B, 2C, H, W]``."""
        out1, out2, out3 = skips
        y = getattr(self, self.latent_name)(deep, prompt)
        y = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(y), out3], 1)), prompt)
        y = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(y), out2], 1)), prompt)
        y = self.decoder_level1(torch.cat([self.up2_1(y), out1], 1), prompt)
        return self.refinement(y, prompt)

    def block_prompt(self, features: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The prompt of the decoder blocks; the plain U-Net has none."""
        return None

    def project_out(self, y: torch.Tensor, stem: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """Decoder features ``[B, 2C, H, W]`` -> image: ``output(y)`` plus the (padded) input."""
        return self.output(y) + padded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, C, H, W]`` -> restored ``[B, C, H, W]`` for any H, W (padded internally to ``pad_multiple``)."""
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        stem = self.patch_embed(padded)
        skips, deep = self.encode(stem)
        y = self.decode(deep, skips, self.block_prompt({'domain': stem, 'task': deep}))
        return self.project_out(y, stem, padded)[..., :h, :w]


@register(ARCH_REGISTRY, aliases=('Restormer',))
class PaddedRestormer(RestormerUNet):
    """Restormer (Zamir et al. 2022) that zero-pads the input to a multiple of 8 and crops the output.

    Registered as ``Restormer`` with the official arguments, so DATPRL-IR's prompt-free option files and checkpoints
    work. ``dual_pixel_task`` adds a skip convolution at level 1 and drops the global residual.
    """

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 LayerNorm_type: str = 'WithBias', dual_pixel_task: bool = False, literal: bool = False,  # noqa: N803
                 use_checkpoint: bool = False):
        super().__init__()
        args = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm_type=LayerNorm_type,
                    literal=literal)
        self.dual_pixel_task = dual_pixel_task
        self.patch_embed = PatchEmbed(inp_channels, dim)
        self.build_encoder(dim, num_blocks[:3], heads, **args)
        self.build_decoder(dim, num_blocks[3], num_blocks[:3], num_refinement_blocks, heads, **args)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, 1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)
        set_checkpointing(self, use_checkpoint)

    def project_out(self, y: torch.Tensor, stem: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """With ``dual_pixel_task``: ``output(y + skip_conv(stem))``, no global residual."""
        if self.dual_pixel_task:
            return self.output(y + self.skip_conv(stem))
        return super().project_out(y, stem, padded)
