"""Finding a backbone's feature taps and injection points: module names, execution order and feature layout.

A backbone is probed once at construction: one forward of a small random batch with hooks on every submodule records
when each module starts and ends (its first call) and what it returns. A module's output is usable as a tap or an
injection point when it is a feature map ``[B, C, H, W]`` or a token sequence ``[B, N, C]`` of the probe's batch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ...errors import NetworkOptionError

PROBE_BATCH = 2  # two images, so the batch axis can be told from the others (window batches of SwinIR are larger)
LISTED_DEPTH = 2  # error messages list module names of at most this many dotted parts


@dataclass(frozen=True)
class ModuleRun:
    """One module's first call in the probe: its place in the call order and its output's layout."""
    name: str
    start: int
    end: int
    layout: Optional[str]  # 'map' [B, C, H, W], 'tokens' [B, N, C], None: not usable
    channels: int = 0


@dataclass(frozen=True)
class Probe:
    """What one forward of the backbone showed: its modules' runs by name, the input and the output shape."""
    runs: Mapping[str, ModuleRun]
    input_shape: tuple[int, ...]
    output_shape: Optional[tuple[int, ...]]

    def usable(self) -> list[str]:
        """Names of modules whose outputs can be tapped or fused, in call order."""
        return [r.name for r in sorted(self.runs.values(), key=lambda r: r.end) if r.layout]

    def listing(self) -> str:
        """The usable names for an error message: the shallow ones in full, the nested ones counted."""
        names = self.usable()
        shallow = [n for n in names if n.count('.') < LISTED_DEPTH]
        rest = len(names) - len(shallow)
        return ', '.join(shallow) + (f' (and {rest} nested modules)' if rest else '')


def _layout(output: Any) -> tuple[Optional[str], int]:
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.shape[0] != PROBE_BATCH:
        return None, 0
    if output.ndim == 4:
        return 'map', output.shape[1]
    if output.ndim == 3:
        return 'tokens', output.shape[2]
    return None, 0


@torch.no_grad()
def probe_backbone(net: nn.Module, in_channels: int, size: int) -> Probe:
    """Run ``net`` (in eval mode, without gradients) on a ``[2, in_channels, size, size]`` random batch and record
    every submodule's first call. Raises ``NetworkOptionError`` with the backbone's own message when it fails."""
    runs, started, counter = {}, {}, [0]

    def before(name):
        def hook(module, args):
            if name not in started:
                started[name] = counter[0]
                counter[0] += 1
        return hook

    def after(name):
        def hook(module, args, output):
            if name not in runs:
                runs[name] = ModuleRun(name, started[name], counter[0], *_layout(output))
                counter[0] += 1
        return hook

    handles = []
    for name, module in net.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
    x = torch.rand(PROBE_BATCH, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    training = net.training
    try:
        net.eval()
        output = net(x)
    except Exception as err:  # any failure of foreign code: reported with its message
        raise NetworkOptionError(f'{type(net).__name__} fails on a probe input of shape {list(x.shape)}: '
                                 f'{type(err).__name__}: {err}. Set in_channels / probe_size to what it '
                                 'accepts.') from err
    finally:
        net.train(training)
        for handle in handles:
            handle.remove()
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    return Probe(runs, tuple(x.shape), shape)


def resolve_modules(patterns: Iterable[str], probe: Probe, what: str) -> list[str]:
    """Module names for ``patterns``: each an exact module name, or else a regular expression matched against whole
    names (as peft's ``target_modules``); returned in call order. A pattern that matches no usable module is a
    ``NetworkOptionError`` naming ``what`` and listing the usable names."""
    usable = probe.usable()
    chosen = set()
    for pattern in patterns:
        if pattern in usable:
            chosen.add(pattern)
            continue
        why = _unusable(pattern, probe)
        try:
            matches = [n for n in usable if re.fullmatch(pattern, n)]
        except re.error as err:
            raise NetworkOptionError(f"{what}: '{pattern}' {why} and is not a valid regular expression ({err}); "
                                     f'usable modules: {probe.listing()}') from err
        if not matches:
            raise NetworkOptionError(f"{what}: '{pattern}' {why} and matches none as a regular expression; "
                                     f'usable modules: {probe.listing()}')
        chosen.update(matches)
    return sorted(chosen, key=lambda n: probe.runs[n].end)


def _unusable(name: str, probe: Probe) -> str:
    """Why ``name`` is not a usable module (for error messages)."""
    if name not in probe.runs:
        return 'names no module that runs in the forward'
    return 'names a module whose output is neither a feature map [B, C, H, W] nor tokens [B, N, C]'


def tap_module(name: str, probe: Probe, what: str) -> ModuleRun:
    """The run of the exactly named tap module; ``NetworkOptionError`` listing the usable names otherwise."""
    run = probe.runs.get(name)
    if run is None or not run.layout:
        raise NetworkOptionError(f"{what}: '{name}' {_unusable(name, probe)}; usable modules: {probe.listing()}")
    return run


def token_grid(tokens: torch.Tensor, call: Sequence[Any], image_size: Sequence[int]) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``tokens [B, N, C]``: a pair of ints with ``h*w == N`` among the module's arguments
    (SwinIR passes ``x_size``), else the image size divided by the one stride that gives N tokens."""
    count = tokens.shape[1]
    for value in call:
        if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
                isinstance(v, int) for v in value) and value[0] * value[1] == count:
            return int(value[0]), int(value[1])
    height, width = image_size
    stride = math.isqrt(max(height * width // max(count, 1), 1))
    if stride and height % stride == 0 and width % stride == 0 and (height // stride) * (width // stride) == count:
        return height // stride, width // stride
    raise NetworkOptionError(f'cannot tell the grid of {count} tokens from a {height}x{width} input; tap a module that '
                             'outputs a feature map [B, C, H, W] instead')


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, C, h, w]`` (row-major tokens, as patch embeddings lay them out)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
