"""DATPRL's prompts for any registered backbone: ``PromptedBackbone`` wraps a network built from BasicSR's
ARCH_REGISTRY (SwinIR, RRDBNet, EDSR, RCAN, our Restormer...) without touching its code.

Forward hooks on named modules of the backbone do the work: the ``taps`` hand their outputs to the queries (the
domain query reads ``taps.domain``, the task query ``taps.task``); once every tap has run, the prompt is composed
(the same pools and composition as DATPRL); every module of ``inject_after`` then has its output passed through a
gated fusion (AGF) with that prompt. Feature maps ``[B, C, H, W]`` and token sequences ``[B, N, C]`` are both
handled; channels, layouts and the call order are found by probing the backbone once at construction.

``prompt.type`` other than ``DualPool`` replaces the pools by a prompt mode of :mod:`.prompt.modes` (MiO IR's
explicit and adaptive prompts, TAP's low-rank prompts, DPPD's prompt distributions); a mode reading the input image
composes its prompt before the backbone runs, and the same gated fusions inject it.

The backbone's keys stay intact under ``backbone.``: a plain backbone checkpoint loads with
:meth:`PromptedBackbone.load_backbone` (option ``path.pretrain_network_backbone``). With ``fusion.gate_init:
identity`` (the default) the wrapped network's output equals the bare backbone's exactly at initialisation.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY

from ..errors import NetworkOptionError
from ..utils.checkpoint import extract_state_dict, load_weights, read_checkpoint
from ..utils.registry import register
from .padding import check_pad_mode, check_pad_multiple, pad_to_multiple
from .prompt import GatedFusion, PoolSpec, PromptConfig, PromptSystem
from .prompt.compose import COMPOSITIONS
from .prompt.fusion import FUSIONS, check_gate_init
from .prompt.modes import INPUT_TAP, PROMPT_MODES, PromptMode
from .prompt.taps import Probe, probe_backbone, resolve_modules, tap_module, token_grid, tokens_to_map

DEFAULT_PROBE_SIZE = 64
#: The prompt options and their defaults: the demo's pools (``domain_pool: null`` gives the task pool only).
DEFAULT_POOLS = {'task_pool': {'size': 12, 'dim': 64, 'top_k': 3}, 'domain_pool': {'size': 6, 'dim': 64, 'top_k': 2}}
DUAL_POOL = 'DualPool'  # prompt.type of DATPRL's task and domain pools (the default); else a prompt mode
PROMPT_KEYS = ('type', 'task_pool', 'domain_pool', 'value_num_tokens', 'composition', 'lean')
MODE_WRAPPER_KEYS = ('type', 'value_num_tokens', 'lean')  # prompt keys of a mode that the wrapper reads itself
POOL_KEYS = ('size', 'dim', 'top_k', 'query_grid')
FUSION_KEYS = ('method', 'gate_init')
DEFAULT_FUSION = {'method': 'cross_attention', 'gate_init': 'identity'}
DEFAULT_VALUE_TOKENS = 2
#: Constructor arguments that name a backbone's input channels, by architecture family.
INPUT_CHANNEL_ARGUMENTS = ('in_chans', 'num_in_ch', 'inp_channels', 'img_channel', 'in_channels', 'in_nc')
DEFAULT_INPUT_CHANNELS = 3
MIN_TAP_CHANNELS = 4  # the query halves and quarters its input channels


def _unknown(section: str, given: Mapping, accepted: Sequence[str]) -> None:
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise NetworkOptionError(f"{section}: unknown key '{unknown[0]}' (accepted: {', '.join(accepted)})")


def _pool(name: str, options: Mapping) -> tuple[PoolSpec, Optional[tuple[int, int]]]:
    section = f'prompt.{name}'
    if not isinstance(options, Mapping):
        raise NetworkOptionError(f'{section} must be a mapping (size, dim, top_k), got {options!r}')
    _unknown(section, options, POOL_KEYS)
    merged = {**DEFAULT_POOLS[name], **options}
    for key in ('size', 'dim', 'top_k'):
        if not isinstance(merged[key], int) or isinstance(merged[key], bool) or merged[key] < 1:
            raise NetworkOptionError(f'{section}.{key} must be a positive integer, got {merged[key]!r}')
    if merged['top_k'] > merged['size']:
        raise NetworkOptionError(f"{section}.top_k must lie in [1, {section}.size={merged['size']}], "
                                 f"got {merged['top_k']}")
    grid = merged.get('query_grid')
    if grid is not None:
        if not (isinstance(grid, Sequence) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)):
            raise NetworkOptionError(f'{section}.query_grid must be two positive integers (pooled sizes), got {grid!r}')
        grid = (grid[0], grid[1])
    return PoolSpec(merged['size'], merged['dim'], merged['top_k']), grid


def prompt_config(prompt: Optional[Mapping], fusion: Optional[Mapping]) -> tuple[PromptConfig, dict, str]:
    """The validated :class:`PromptConfig` of the wrapper's ``prompt`` and ``fusion`` options, the query grids by
    tap, and the gate init; every bad value is a ``NetworkOptionError`` naming its key."""
    prompt = {k: v for k, v in dict(prompt or {}).items() if k != 'type'}
    fusion = dict(fusion or {})
    _unknown('prompt', prompt, PROMPT_KEYS)
    _unknown('fusion', fusion, FUSION_KEYS)
    fusion = {**DEFAULT_FUSION, **fusion}
    task, task_grid = _pool('task_pool', prompt.get('task_pool') or {})
    domain, domain_grid = (None, None)
    if prompt.get('domain_pool', DEFAULT_POOLS['domain_pool']) is not None:
        domain, domain_grid = _pool('domain_pool', prompt.get('domain_pool') or {})
    composition = prompt.get('composition', COMPOSITIONS[0])
    if composition not in COMPOSITIONS:
        raise NetworkOptionError(f'prompt.composition must be one of {COMPOSITIONS}, got {composition!r}')
    if fusion['method'] not in FUSIONS:
        raise NetworkOptionError(f"fusion.method must be one of {FUSIONS}, got {fusion['method']!r}")
    try:
        gate_init = check_gate_init(fusion['gate_init'])
        config = PromptConfig(task, domain, prompt.get('value_num_tokens', DEFAULT_VALUE_TOKENS), composition,
                              fusion['method'], lean=bool(prompt.get('lean', True)))
    except ValueError as err:
        raise NetworkOptionError(f'prompt: {err}') from err
    grids = {tap: grid for tap, grid in (('task', task_grid), ('domain', domain_grid)) if grid is not None}
    return config, grids, gate_init


def fusion_config(width: int, prompt: Mapping, fusion: Optional[Mapping]) -> tuple[PromptConfig, str]:
    """The config of the gated fusions for a prompt mode's ``width`` prompt (no pools), and the gate init."""
    fusion = {**DEFAULT_FUSION, **dict(fusion or {})}
    _unknown('fusion', fusion, FUSION_KEYS)
    if fusion['method'] not in FUSIONS:
        raise NetworkOptionError(f"fusion.method must be one of {FUSIONS}, got {fusion['method']!r}")
    try:
        gate_init = check_gate_init(fusion['gate_init'])
        return PromptConfig(PoolSpec(1, width, 1), None, prompt.get('value_num_tokens', DEFAULT_VALUE_TOKENS),
                            fusion=fusion['method'], lean=bool(prompt.get('lean', True))), gate_init
    except ValueError as err:
        raise NetworkOptionError(f'prompt: {err}') from err


def build_mode(prompt: Mapping, channels: Mapping[str, int]) -> PromptMode:
    """The prompt mode ``prompt['type']`` built from the rest of ``prompt``; a bad option names it."""
    mode_type = prompt['type']
    options = {k: v for k, v in prompt.items() if k not in MODE_WRAPPER_KEYS}
    try:
        return PROMPT_MODES[mode_type](channels, **options)
    except TypeError as err:
        raise NetworkOptionError(f'prompt ({mode_type}): {err}') from err
    except ValueError as err:
        raise NetworkOptionError(f'prompt: {err}') from err


def mode_type(prompt: Optional[Mapping]) -> str:
    """``prompt.type``: :data:`DUAL_POOL` (default) or a registered prompt mode; else an error listing them."""
    if prompt is not None and not isinstance(prompt, Mapping):
        raise NetworkOptionError(f'prompt must be a mapping, got {prompt!r}')
    kind = (prompt or {}).get('type', DUAL_POOL)
    if kind != DUAL_POOL and kind not in PROMPT_MODES:
        raise NetworkOptionError(f"prompt.type must be one of {[DUAL_POOL, *PROMPT_MODES]}, got {kind!r}")
    return kind


def build_backbone(options: Mapping) -> nn.Module:
    """The backbone network of ``options`` (``type`` plus its arguments) from BasicSR's ARCH_REGISTRY."""
    from basicsr.archs import build_network

    if not isinstance(options, Mapping) or 'type' not in options:
        raise NetworkOptionError(f'backbone must be a mapping with a type (a registered network), got {options!r}')
    if options['type'] == PromptedBackbone.__name__:
        raise NetworkOptionError('backbone: a PromptedBackbone cannot wrap another PromptedBackbone')
    if options['type'] not in ARCH_REGISTRY:
        raise NetworkOptionError(f"backbone.type '{options['type']}' is not a registered network (BasicSR's "
                                 "ARCH_REGISTRY and this package's networks; a plugin must be imported first)")
    try:
        net = build_network(dict(options))
    except TypeError as err:
        raise NetworkOptionError(f"backbone {options['type']}: {err}") from err
    if isinstance(net, PromptSystem) and net.prompt_width is not None:
        raise NetworkOptionError(f"backbone {options['type']} has a prompt system of its own: wrap its prompt-free "
                                 'form (use_prompt: false), or train it without PromptedBackbone')
    return net


def input_channels(options: Mapping) -> int:
    """The backbone's input channels from its options (``in_chans``, ``num_in_ch``, ...), else 3."""
    return next((int(options[k]) for k in INPUT_CHANNEL_ARGUMENTS if k in options), DEFAULT_INPUT_CHANNELS)


class _TapHook:
    """Forward hook of a query tap: hands the module's output to the host's prompt retrieval."""

    def __init__(self, host: PromptedBackbone, tap: str):
        self.host, self.tap = host, tap

    def __call__(self, module, args, kwargs, output):
        self.host._tapped(self.tap, output, (*args, *kwargs.values()))


class _InjectionHook:
    """Forward hook of an injection point: replaces the module's output by its gated fusion with the prompt."""

    def __init__(self, host: PromptedBackbone, index: int):
        self.host, self.index = host, index

    def __call__(self, module, args, output):
        return self.host._inject(self.index, output)


@register(ARCH_REGISTRY)
class PromptedBackbone(PromptSystem):
    """A registered backbone with DATPRL's task and domain prompt pools, or another prompt mode (see the module
    docstring).

    Args:
        backbone: the backbone's options, ``type`` (a registered network) and its arguments; it must restore at
            scale 1 (output the input's size).
        taps: ``{'domain': name, 'task': name}``: the modules (dotted names of the backbone, e.g. ``conv_first``,
            ``layers.1``) whose outputs the domain and the task query read; ``domain`` only with a domain pool. Each
            must finish before the first injection point.
        inject_after: module names, or regular expressions matched against whole names (as peft's
            ``target_modules``), whose outputs receive the prompt through gated fusion.
        prompt: ``type``: 'DualPool' (default, DATPRL) or a prompt mode of :mod:`.prompt.modes`
            (``ExplicitPrompt``, ``AdaptivePrompt``, ``LowRankPrompt``, ``DistributionPrompt``) with its options.
            DualPool: ``task_pool`` and ``domain_pool`` (``size``, ``dim``, ``top_k``, optional ``query_grid``; the
            defaults are :data:`DEFAULT_POOLS`; ``domain_pool: null``: task pool only), ``value_num_tokens`` (2),
            ``composition`` ('cross_attention' or 'concat'), ``lean`` (true: no parameters that cannot affect the
            output).
        fusion: ``method`` ('cross_attention', 'concat' or 'adaptive_modulation') and ``gate_init`` ('identity':
            the output equals the bare backbone's at initialisation; 0.5: the paper's gates).
        in_channels: input channels for the probe (default: from the backbone's options, else 3).
        probe_size: side of the square probe input (a size the backbone accepts).
        pad_multiple, pad_mode: the input is padded to a multiple of ``pad_multiple`` (``pad_mode`` 'reflect',
            'replicate' or 'constant') and the output cropped back, for backbones that need one (BasicSR's SwinIR
            needs a multiple of its window size); 1: no padding.
    """

    def __init__(self, backbone: Mapping[str, Any], taps: Optional[Mapping[str, str]],
                 inject_after: Union[str, Sequence[str]],
                 prompt: Optional[Mapping[str, Any]] = None, fusion: Optional[Mapping[str, Any]] = None,
                 in_channels: Optional[int] = None, probe_size: int = DEFAULT_PROBE_SIZE, pad_multiple: int = 1,
                 pad_mode: str = 'reflect'):
        super().__init__()
        self.pad_multiple = check_pad_multiple(pad_multiple, 1)
        self.pad_mode = check_pad_mode(pad_mode)
        kind = mode_type(prompt)
        self.prompt_mode: Optional[PromptMode] = None  # the prompt mode of a prompt.type other than DualPool
        if kind == DUAL_POOL:
            config, grids, gate_init = prompt_config(prompt, fusion)
            needed = ('domain', 'task') if config.domain is not None else ('task',)
        else:
            needed = tuple(tap for tap in PROMPT_MODES[kind].taps if tap != INPUT_TAP)
        self.backbone = build_backbone(backbone)
        channels = in_channels or input_channels(backbone)
        probe = probe_backbone(self.backbone, channels, probe_size)
        self._check_scale_one(probe)
        runs = self._taps(dict(taps or {}), needed, probe, kind == DUAL_POOL)
        points = resolve_modules([inject_after] if isinstance(inject_after, str) else list(inject_after or ()),
                                 probe, 'inject_after')
        if not points:
            raise NetworkOptionError(f'inject_after names no module; usable modules: {probe.listing()}')
        self._check_order(runs, points, probe)
        if kind == DUAL_POOL:
            self.build_prompt_system({tap: run.channels for tap, run in runs.items()}, config, grids)
        else:
            self.prompt_mode = build_mode(prompt, {INPUT_TAP: channels, **{t: r.channels for t, r in runs.items()}})
            config, gate_init = fusion_config(self.prompt_mode.prompt_width, prompt, fusion)
            self.prompt_members, self.prompt_width = ('prompt_mode',), self.prompt_mode.prompt_width
        self.fusions = nn.ModuleList(GatedFusion(probe.runs[name].channels, config, probe.runs[name].layout,
                                                 gate_init) for name in points)
        self.reads_input = self.prompt_mode is not None and INPUT_TAP in self.prompt_mode.taps
        self._task_labels: Optional[torch.Tensor] = None
        self.tap_modules = {tap: run.name for tap, run in runs.items()}
        self.tap_layouts = {tap: run.layout for tap, run in runs.items()}
        self.injection_points = tuple(points)
        self._features: dict = {}
        self._prompt: Optional[torch.Tensor] = None
        self._image_size: tuple[int, int] = (probe_size, probe_size)
        modules = dict(self.backbone.named_modules())
        for tap, name in self.tap_modules.items():
            modules[name].register_forward_hook(_TapHook(self, tap), with_kwargs=True)
        for index, name in enumerate(points):
            modules[name].register_forward_hook(_InjectionHook(self, index))
        self._check_forward(probe)

    # ------------------------------------------------------------------ construction checks
    def _check_scale_one(self, probe: Probe) -> None:
        if probe.output_shape != probe.input_shape:
            got = 'no tensor' if probe.output_shape is None else f'{list(probe.output_shape)}'
            raise NetworkOptionError(f'{type(self.backbone).__name__} maps a {list(probe.input_shape)} input to '
                                     f'{got}; PromptedBackbone restores at scale 1 (output of the input size): give '
                                     'the backbone its scale-1 setting (upscale: 1, scale: 1), or a backbone that has '
                                     'one')

    @staticmethod
    def _taps(taps: dict, needed: Sequence[str], probe: Probe, dual_pool: bool = True) -> dict:
        unknown = [t for t in taps if t not in needed]
        if unknown:
            extra = ' (the domain tap needs a domain pool)' if unknown == ['domain'] and dual_pool else ''
            raise NetworkOptionError(f"taps: unknown tap '{unknown[0]}'; this prompt system reads "
                                     f'{list(needed)}{extra}')
        missing = [t for t in needed if t not in taps]
        if missing:
            raise NetworkOptionError(f"taps: '{missing[0]}' is missing: name the module whose output the "
                                     f'{missing[0]} query reads; usable modules: {probe.listing()}')
        runs = {tap: tap_module(taps[tap], probe, f'taps.{tap}') for tap in needed}
        for tap, run in runs.items():
            if run.channels < MIN_TAP_CHANNELS:
                raise NetworkOptionError(f"taps.{tap}: '{run.name}' outputs {run.channels} channels; a query "
                                         f'needs at least {MIN_TAP_CHANNELS}')
        return runs

    @staticmethod
    def _check_order(runs: dict, points: Sequence[str], probe: Probe) -> None:
        first = min(points, key=lambda n: probe.runs[n].end)
        for tap, run in runs.items():
            if run.end >= probe.runs[first].end:
                raise NetworkOptionError(f"taps.{tap}: '{run.name}' finishes after the injection point '{first}': "
                                         'the prompt must be composed before it is injected; tap an earlier module '
                                         'or inject later')

    @torch.no_grad()
    def _check_forward(self, probe: Probe) -> None:
        """One forward of the probe input through the wrapper: every tap and injection works (a mode with a prompt
        per task is given its first task, as a label would)."""
        x = torch.rand(probe.input_shape, generator=torch.Generator().manual_seed(0))
        training = self.training
        if getattr(self.prompt_mode, 'task_names', None):
            self._task_labels = torch.zeros(x.shape[0], dtype=torch.long)
        try:
            self.eval()
            self(x)
        finally:
            self.train(training)
            self.prompt_state, self._task_labels = None, None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, C, H, W]`` -> the backbone's output, with the prompt injected at ``injection_points``."""
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        self._features, self._prompt, self._image_size = {}, None, tuple(x.shape[-2:])
        try:
            if self.reads_input:
                self._features[INPUT_TAP] = x
                self._compose_when_ready()
            return self.backbone(x)[..., :h, :w]  # scale 1 is checked at construction
        finally:
            self._features, self._prompt = {}, None

    def _tapped(self, tap: str, output: torch.Tensor, call: Sequence[Any]) -> None:
        """A tap's output (its first call in this forward); composes the prompt once every tap has run."""
        if tap in self._features:
            return
        if self.tap_layouts[tap] == 'tokens':
            output = tokens_to_map(output, token_grid(output, call, self._image_size))
        self._features[tap] = output
        self._compose_when_ready()

    def _compose_when_ready(self) -> None:
        if len(self._features) == len(self.tap_modules) + self.reads_input:
            self._prompt = self.compose_prompt(self._features)

    def _retrieve_prompt(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dual pools' retrieval, or the prompt mode's (its ModeState becomes ``prompt_state``)."""
        if self.prompt_mode is None:
            return super()._retrieve_prompt(features)
        self.prompt_state = self.prompt_mode(features, self._task_labels)
        return self.prompt_state.prompt

    @property
    def prompt_taps(self) -> tuple[str, ...]:
        return self.prompt_mode.taps if self.prompt_mode is not None else super().prompt_taps

    @contextmanager
    def task_labels(self, names: Optional[Sequence[str]]) -> Iterator[PromptedBackbone]:
        """Within the block, forwards of a mode with a prompt per task (``ExplicitPrompt``, ``LowRankPrompt``) get
        the task labels of ``names`` (a batch's ``task_name``s, looked up in the mode's ``tasks``); the training
        model wraps its step in this. Other modes, and ``names=None``, change nothing."""
        tasks = self.prompt_mode.task_names if self.prompt_mode is not None else ()
        if not tasks or names is None:
            yield self
            return
        unknown = sorted(set(names) - set(tasks))
        if unknown:
            raise NetworkOptionError(f"the batch's task {unknown[0]!r} is not in prompt.tasks {list(tasks)} of "
                                     f'{type(self.prompt_mode).__name__}: list every training task there')
        device = next(self.prompt_mode.parameters()).device
        previous = self._task_labels
        self._task_labels = torch.tensor([tasks.index(n) for n in names], device=device)
        try:
            yield self
        finally:
            self._task_labels = previous

    def _inject(self, index: int, output: torch.Tensor) -> torch.Tensor:
        if self._prompt is None:
            missing = [self.tap_modules[t] for t in self.tap_modules if t not in self._features]
            raise RuntimeError(f"PromptedBackbone: injection point '{self.injection_points[index]}' ran before the "
                               f'query taps {missing} in this forward')
        return self.fusions[index](output, self._prompt)

    # ------------------------------------------------------------------ weights
    def load_backbone(self, path: str, param_key: Optional[str] = None, strict: bool = True) -> PromptedBackbone:
        """Load a plain backbone checkpoint (BasicSR ``params``/``params_ema``, or a bare state_dict) into
        ``backbone``, with strict key matching; the prompt parameters keep their values. Returns ``self``."""
        load_weights(self.backbone, extract_state_dict(read_checkpoint(path), param_key, source=path), path, strict)
        return self

    def extra_repr(self) -> str:
        return f'taps={self.tap_modules}, inject_after={list(self.injection_points)}'
