"""Adaptive gated fusion (AGF): injecting the composed prompt ``c [B, P]`` into features ``x``: a map
``[B, C, H, W]`` or a token sequence ``[B, N, C]`` (SwinIR's layers).

Every prompted block owns a gate pair ``(feature_weight, prompt_weight)``; ``(a_f, a_p) = softmax`` of the pair
weighs features against the prompt. Three fusion modes:

- ``cross_attention``: pixels attend to the prompt. The prompt is a single key, so the softmax is exactly 1 and the
  result is a per-sample, per-channel bias: ``x_in = a_f*x + W_out(a_p*W_v(LN(c)))``. We compute that closed form
  once per sample; the per-pixel query/output projections of the official code are skipped (``literal`` keeps them).
- ``concat``: ``x_in = conv1x1([a_f*x ; a_p*W_p c])``; the prompt half of the 1x1 convolution is a per-sample bias.
- ``adaptive_modulation``: ``[s ; t] = MLP(c)``, ``x_in = a_f*x*(1 + a_p*s) + a_p*t``.

``gate_init``: ``0.5`` (the paper: both gates start at 0.5) or ``identity``, for prompting a trained backbone: the
features are scaled by ``a_f / 0.5`` (exactly 1 at the start) and the prompt path's last layer starts at zero (the
concat fusion's feature half at the identity), so the fused features equal ``x`` exactly until training moves them.
:class:`GatedFusion` is the fusion as a module of its own, for backbones whose code we do not own.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from .config import PromptConfig

FUSIONS = ('cross_attention', 'concat', 'adaptive_modulation')
GATE_INIT = 0.5
GATE_INITS = ('0.5', 'identity')
LAYOUTS = ('map', 'tokens')  # [B, C, H, W] or [B, N, C]
DEAD_CROSS_ATTENTION = ('cross_attn_q', 'cross_attn_k')  # cannot affect the output (single-key softmax)
FUSION_LAYERS = {
    'cross_attention': ('cross_attn_q', 'cross_attn_k', 'cross_attn_v', 'cross_attn_out', 'prompt_norm'),
    'concat': ('prompt_projection', 'prompt_fusion'),
    'adaptive_modulation': ('prompt_mlp',),
}


def check_fusion(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of :data:`FUSIONS`."""
    if method not in FUSIONS:
        raise ValueError(f"fusion_method must be one of {FUSIONS}, got '{method}'")


def check_gate_init(gate_init) -> str:
    """``gate_init`` as one of :data:`GATE_INITS` (``0.5`` may be given as a number); else ``ValueError``."""
    text = 'identity' if gate_init == 'identity' else str(float(gate_init)) if isinstance(gate_init, (int, float)) \
        else str(gate_init)
    if text not in GATE_INITS:
        raise ValueError(f"fusion gate_init must be one of {GATE_INITS}, got {gate_init!r}")
    return text


def dead_parameter_names(net: nn.Module) -> set[str]:
    """Parameters that need no training: the single-key attention queries and keys of every block that computes the
    closed form (they cannot affect the output; they stay registered, official checkpoints carry them), and those a
    module reports through ``untrained_parameter_names()`` (a prompt mode's classifier whose loss weight is 0)."""
    dead = {f'{prefix}.{name}' for prefix, block in net.named_modules()
            if isinstance(block, PromptedBlock) and block.fusion_method == 'cross_attention' and not block.literal
            for member in DEAD_CROSS_ATTENTION if hasattr(block, member)
            for name in (f'{member}.weight', f'{member}.bias')}
    for prefix, module in net.named_modules():
        untrained = getattr(module, 'untrained_parameter_names', None)
        if callable(untrained):
            dead |= {f'{prefix}.{name}' if prefix else name for name in untrained()}
    return dead


class PromptedBlock(nn.Module):
    """Mixin for backbone blocks that take a prompt. A block calls ``build_fusion`` after creating its own layers
    (official key order: gates first, fusion layers after the block's layers) and ``fuse(x, prompt)`` in forward.

    Parameters are registered on the block itself, with official names, so official checkpoints load unchanged.
    Without a prompt configuration nothing is created and ``fuse`` is the identity (a plain backbone block).
    """

    fusion_method: Optional[str] = None
    prompt_members: tuple[str, ...] = ()  # attributes that belong to the prompt system (see prompt_parameter_names)
    layout = 'map'  # the features' layout, one of LAYOUTS
    feature_scale = 1.0  # 1 / a_f at init with gate_init 'identity' (see the module docstring)

    def build_fusion(self, dim: int, prompt: Optional[PromptConfig], gate_init='0.5') -> None:
        """Create the AGF gates and the ``prompt.fusion`` layers for ``dim`` channels and a ``prompt.width`` prompt.

        ``prompt.lean`` skips the dead ``cross_attn_q``/``cross_attn_k`` (their official weights are dropped on load);
        ``prompt.literal`` computes the fusion per pixel exactly as the official code (benchmark baseline);
        ``gate_init`` 'identity' starts the fusion at the identity (module docstring).
        """
        if prompt is None:
            return
        method, lean, prompt_dim = prompt.fusion, prompt.lean, prompt.width
        self.fusion_method, self.lean, self.literal = method, lean, prompt.literal
        identity = check_gate_init(gate_init) == 'identity'
        if identity and prompt.literal:
            raise ValueError("gate_init 'identity' and literal=True (the official computation) exclude each other")
        self.feature_weight = nn.Parameter(torch.tensor([GATE_INIT]))
        self.prompt_weight = nn.Parameter(torch.tensor([GATE_INIT]))
        if method == 'cross_attention':
            if not lean:
                self.cross_attn_q = nn.Linear(dim, dim)
                self.cross_attn_k = nn.Linear(prompt_dim, dim)
            self.cross_attn_v = nn.Linear(prompt_dim, dim)
            self.cross_attn_out = nn.Linear(dim, dim)
            self.prompt_norm = nn.LayerNorm(prompt_dim)
        elif method == 'concat':
            self.prompt_projection = nn.Linear(prompt_dim, dim)
            self.prompt_fusion = nn.Conv2d(2 * dim, dim, 1)
        else:
            self.prompt_mlp = nn.Sequential(nn.Linear(prompt_dim, 2 * dim), nn.ReLU(inplace=True),
                                            nn.Linear(2 * dim, 2 * dim))
        self.prompt_members = ('feature_weight', 'prompt_weight', *FUSION_LAYERS[method])
        if identity:
            self._start_at_identity(dim)

    @torch.no_grad()
    def _start_at_identity(self, dim: int) -> None:
        """gate_init 'identity': unit feature scale, the prompt path's last layer at zero (concat: [I, 0])."""
        self.feature_scale = 1.0 / GATE_INIT
        last = {'cross_attention': lambda: self.cross_attn_out, 'concat': lambda: self.prompt_fusion,
                'adaptive_modulation': lambda: self.prompt_mlp[-1]}[self.fusion_method]()
        last.weight.zero_()
        last.bias.zero_()
        if self.fusion_method == 'concat':
            last.weight[:, :dim].view(dim, dim).copy_(torch.eye(dim))

    def _bias(self, bias: torch.Tensor) -> torch.Tensor:
        """[B, C] -> broadcastable over the features' positions: [B, C, 1, 1] (map) or [B, 1, C] (tokens)."""
        return bias[:, :, None, None] if self.layout == 'map' else bias[:, None, :]

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """AGF weights ``(a_f, a_p)``, each of shape [1], summing to 1."""
        a = torch.cat([self.feature_weight, self.prompt_weight]).softmax(dim=0)
        return a[0:1], a[1:2]

    def fuse(self, x: torch.Tensor, prompt: Optional[torch.Tensor]) -> torch.Tensor:
        """x ``[B, C, H, W]`` (``[B, N, C]`` for the token layout), prompt ``[B, P]`` or None -> fused features of
        x's shape."""
        if self.fusion_method is None or prompt is None:
            return x
        a_f, a_p = self.gates()
        if self.feature_scale != 1.0:
            a_f = a_f * self.feature_scale
        if self.fusion_method == 'cross_attention':
            if self.literal:
                return self._literal_cross_attention(x, prompt, a_f, a_p)
            bias = self.cross_attn_out(a_p * self.cross_attn_v(self.prompt_norm(prompt)))
            # in x's dtype: under autocast a float32 gate would turn bf16 features into a float32 copy
            return torch.addcmul(self._bias(bias).to(x.dtype), a_f.to(x.dtype), x)
        if self.fusion_method == 'concat':
            prompt_map = a_p * self.prompt_projection(prompt)
            if self.literal:
                return self.prompt_fusion(torch.cat([a_f * x, self._bias(prompt_map).expand_as(x)], dim=1))
            weight = self.prompt_fusion.weight.flatten(1)
            channels = weight.shape[0]
            bias = F.linear(prompt_map, weight[:, channels:], self.prompt_fusion.bias)
            if self.layout == 'tokens':
                return F.linear(x, weight[:, :channels] * a_f) + self._bias(bias)
            return F.conv2d(x, self.prompt_fusion.weight[:, :channels] * a_f) + self._bias(bias)
        scale, shift = self.prompt_mlp(prompt).chunk(2, dim=-1)
        return a_f * x * (1 + a_p * self._bias(scale)) + a_p * self._bias(shift)

    def _literal_cross_attention(self, x, prompt, a_f, a_p):
        """The official per-pixel computation: every pixel attends to the one prompt token."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        prompt = self.prompt_norm(prompt)[:, None]  # [B, 1, P]
        q = a_f * self.cross_attn_q(tokens)
        k = a_p * self.cross_attn_k(prompt)
        v = a_p * self.cross_attn_v(prompt)
        attn = (q @ k.transpose(1, 2) / math.sqrt(c)).softmax(dim=-1)  # [B, HW, 1]
        out = self.cross_attn_out(attn @ v)
        return a_f * x + out.transpose(1, 2).reshape(b, c, h, w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if getattr(self, 'lean', False):  # official checkpoints carry the dead projections: drop them
            for name in DEAD_CROSS_ATTENTION:
                for key in [k for k in state_dict if k.startswith(f'{prefix}{name}.')]:
                    del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GatedFusion(PromptedBlock):
    """AGF as a module of its own: ``fusion(x, prompt)`` injects a ``config.width`` prompt into features of ``dim``
    channels in ``layout`` 'map' ``[B, C, H, W]`` or 'tokens' ``[B, N, C]``; ``gate_init`` as in the module docstring.
    The parameters and their names are those of a prompted block."""

    def __init__(self, dim: int, config: PromptConfig, layout: str = 'map', gate_init='identity'):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"fusion layout must be one of {LAYOUTS}, got '{layout}'")
        self.layout = layout
        self.build_fusion(dim, config, gate_init)

    def forward(self, x: torch.Tensor, prompt: Optional[torch.Tensor]) -> torch.Tensor:
        return self.fuse(x, prompt)


class BlockStack(nn.ModuleList):
    """Blocks applied in order, each given the same prompt (None for plain blocks); keys ``<i>.<block key>``, as an
    ``nn.Sequential`` would have them (the official stacks).

    ``use_checkpoint`` (set by :func:`set_checkpointing`): with gradients on, each block's activations are not kept
    for the backward pass but recomputed there (``torch.utils.checkpoint``), trading about one more forward for
    memory. The outputs and gradients are the same.
    """

    use_checkpoint = False

    def forward(self, x: torch.Tensor, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        recompute = self.use_checkpoint and torch.is_grad_enabled()
        for block in self:
            x = checkpoint(block, x, prompt, use_reentrant=False) if recompute else block(x, prompt)
        return x


def set_checkpointing(net: nn.Module, enabled: bool) -> None:
    """Turn gradient checkpointing of every :class:`BlockStack` in ``net`` on or off (``use_checkpoint`` of the
    network options)."""
    for module in net.modules():
        if isinstance(module, BlockStack):
            module.use_checkpoint = bool(enabled)
