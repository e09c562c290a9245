"""A cheap health check of a network's weights: its output on a small fixed input must be finite.

A training step whose loss was finite can still leave weights that restore nothing (a huge learning rate: weights
at 1e10, every output NaN). Before a checkpoint is written (``DATPRLModel.save``) and before ``--auto_resume``
takes a training state (:mod:`.resume`), the network runs once on a seeded ``[1, C, PROBE_SIZE, PROBE_SIZE]`` input
in eval mode under ``no_grad``; a non-finite value in its output refuses the file. One forward pass at 32x32:
milliseconds for the demo network.

Networks are also built here from their options, on the CPU, without a word in BasicSR's log (the option check and
the resume step run before the runners set up the log file; BasicSR's logger takes its file only when first used).
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

#: Side of the square probe input, in pixels: small (cheap) yet a multiple of the usual window and padding sizes.
PROBE_SIZE = 32
#: Seed of the probe input, so every check sees the same values.
PROBE_SEED = 0
#: Logger name of BasicSR's ``get_root_logger``.
BASICSR_LOGGER = 'basicsr'
_MISSING = object()


def probe_channels(network_opt: Optional[Mapping]) -> int:
    """Input channels of the network of ``network_opt`` (``inp_channels``, ``num_in_ch``, ...; a PromptedBackbone's
    ``in_channels`` or its backbone's), else 3."""
    from ..archs.prompted_backbone_arch import input_channels

    options = dict(network_opt or {})
    if options.get('type') == 'PromptedBackbone':
        return int(options.get('in_channels') or input_channels(options.get('backbone') or {}))
    return input_channels(options)


def probe_input(channels: int) -> torch.Tensor:
    """The ``[1, channels, PROBE_SIZE, PROBE_SIZE]`` probe input in ``[0, 1)``, the same on every call."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.rand(1, channels, PROBE_SIZE, PROBE_SIZE, generator=generator)


def output_problem(net: nn.Module, channels: int) -> Optional[str]:
    """Why ``net``'s float32 output on the probe input is unusable (non-finite values), or None. Runs in eval mode
    under ``no_grad`` on the network's device; its mode, its ``prompt_state`` and the random streams are left as they
    were. A network that cannot run the probe at all (an input size it refuses) is not judged here."""
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    x = probe_input(channels).to(device)
    was_training, prompt_state = net.training, net.__dict__.get('prompt_state', _MISSING)
    net.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            out = net(x)
    except (RuntimeError, ValueError):
        return None
    finally:
        net.train(was_training)
        if prompt_state is not _MISSING:
            net.prompt_state = prompt_state
    out = out[0] if isinstance(out, (tuple, list)) else out
    bad = int((~torch.isfinite(out)).sum())
    if not bad:
        return None
    return f'its output on the {list(x.shape)} probe input has {bad} non-finite value(s) of {out.numel()}'


@contextmanager
def silent_basicsr_logger() -> Iterator[None]:
    """BasicSR's logger silenced, and left uninitialised when it was (so the runner still gives it its log file)."""
    from basicsr.utils.logger import initialized_logger

    logger = logging.getLogger(BASICSR_LOGGER)
    fresh, disabled = BASICSR_LOGGER not in initialized_logger, logger.disabled
    initialized_logger[BASICSR_LOGGER] = True
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled
        if fresh:
            initialized_logger.pop(BASICSR_LOGGER, None)


def build_quietly(network_opt: Mapping) -> nn.Module:
    """The network of ``network_opt`` (``type`` and its arguments) built on the CPU by BasicSR's registry, without
    a log line and without drawing from the random streams (the run's seed stays in effect)."""
    from basicsr.archs import build_network

    with silent_basicsr_logger(), torch.random.fork_rng(devices=[]):
        return build_network(copy.deepcopy(dict(network_opt)))


def checkpoint_output_problem(net: nn.Module, path: str, channels: int) -> Optional[str]:
    """Why the weights of the BasicSR network file ``path`` (``params`` and ``params_ema``) give ``net`` a non-finite
    probe output, or None; also None when the file does not fit ``net`` (loading it says so, not this check)."""
    from .checkpoint import PARAM_KEYS

    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # a damaged file is reported by the completeness check, not here
        return None
    for key in [k for k in PARAM_KEYS if isinstance(checkpoint, dict) and k in checkpoint]:
        try:
            net.load_state_dict(checkpoint[key], strict=True)
        except (RuntimeError, TypeError, AttributeError):
            return None
        problem = output_problem(net, channels)
        if problem:
            return f'{path} ({key}) restores nothing: {problem}'
    return None
