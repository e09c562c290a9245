"""Loading network weights from the checkpoint formats DATPRL users have.

- BasicSR files ``{'params': sd}`` / ``{'params_ema': sd}`` (``params_ema`` preferred when present);
- the official natural 3-/5-task PyTorch-Lightning files ``{'state_dict': {'net.<key>': ...}, ...}``;
- plain state_dicts, optionally saved from DataParallel/DDP (``module.`` prefix);
- ``.safetensors`` files; those this package writes (:func:`save_safetensors`) carry the network options in their
  metadata, so they rebuild without an option file;
- ``release``: the release model shipped in the package (:mod:`datprl_arch.weights`).

Pickle files are always read with ``weights_only=True``: a checkpoint cannot run code when it is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import nn

from ..errors import DatprlError
from ..weights import resolve_checkpoint

PARAM_KEYS = ('params_ema', 'params')  # BasicSR, in order of preference
LIGHTNING_KEY, LIGHTNING_PREFIX = 'state_dict', 'net.'
WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DataParallel/DDP and torch.compile wrappers
#: Entry of the checkpoints this package saves that holds the network's ``network_g`` options (type and
#: configuration), so a checkpoint can be rebuilt without its option file (``restore``, ``benchmark``).
NETWORK_KEY = 'network_g'
STAGES_KEY = 'training_stages'  # the train.stages plan with each stage's trainable parameters (DATPRLModel)
#: Entry of a read ``.safetensors`` checkpoint that holds its string metadata (provenance of a shipped model).
METADATA_KEY = 'metadata'
#: Weights entry of a read ``.safetensors`` file whose metadata names its network (written by save_safetensors).
SAFETENSORS_PARAM_KEY = 'params_ema'
HASH_CHUNK = 1 << 20  # bytes read at a time to hash a file


class CheckpointError(DatprlError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the network."""


def load_error_summary(err: Exception) -> str:
    """The informative line of a ``torch.load`` error: for a refused pickle, the global it would have loaded (torch's
    text around it recommends ``weights_only=False``, which would run that code), else the first line."""
    refused = re.search(r'GLOBAL ([\w.]+)', str(err))
    if refused:
        return (f'it holds the Python object {refused[1]}, which loading would have to run; refused, nothing was '
                'executed')
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f'{type(err).__name__}: {lines[0] if lines else ""}'


def read_checkpoint(path: str) -> Mapping:
    """The mapping stored in ``path`` (``.pth``/``.ckpt`` read with ``weights_only=True``, or ``.safetensors``);
    ``release`` reads the shipped release model."""
    path = resolve_checkpoint(path)
    if not os.path.isfile(path):
        where = '' if os.path.isabs(path) else f' (relative to the current directory {os.getcwd()})'
        raise CheckpointError(f'checkpoint {path} does not exist{where}')
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # pickle errors come in many types; all mean the same thing here
        raise CheckpointError(f'cannot read {path} as a PyTorch checkpoint with weights_only=True '
                              f'({load_error_summary(err)}). '
                              'Files holding non-tensor Python objects must be re-saved as a plain state_dict '
                              'from a trusted environment.') from err


def _read_safetensors(path: str) -> Mapping:
    """The tensors of a ``.safetensors`` file; when its metadata names the network (``network_g``, as
    :func:`save_safetensors` writes), ``{'params_ema': tensors, 'network_g': options, 'metadata': strings}``."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open
    except ImportError as err:
        raise CheckpointError(f'{path} is a safetensors file: pip install safetensors') from err
    try:
        tensors = load_file(path, device='cpu')
        with safe_open(path, framework='pt') as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f'cannot read {path} as a safetensors file ({err})') from None
    if NETWORK_KEY not in metadata:
        return tensors
    try:
        network = json.loads(metadata[NETWORK_KEY])
    except ValueError as err:
        raise CheckpointError(f'{path}: metadata {NETWORK_KEY!r} is not JSON ({err})') from None
    return {SAFETENSORS_PARAM_KEY: tensors, NETWORK_KEY: network, METADATA_KEY: metadata}


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str, network: Mapping,
                     metadata: Optional[Mapping[str, str]] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Write network weights to ``path`` as safetensors, atomically, with ``network`` (the ``network_g`` options)
    and ``metadata`` (strings) in its header. ``dtype``: floating tensors are stored in it (e.g. ``torch.float16``
    for a small shipped file; they load back into a float32 network unchanged in shape), except those whose values
    it cannot hold (a usage count above float16's range stays float32)."""
    from safetensors.torch import save_file

    from .atomic import atomic_write_file

    tensors = {k: _stored(v, dtype) for k, v in state_dict.items()}
    header = {**(metadata or {}), NETWORK_KEY: json.dumps(plain_options(network), sort_keys=True)}
    atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _stored(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``tensor`` as safetensors stores it: contiguous on the CPU, in ``dtype`` if floating and within its range."""
    tensor = tensor.detach().cpu()
    if dtype is not None and tensor.is_floating_point() and tensor.numel():
        if float(tensor.abs().max()) <= torch.finfo(dtype).max:
            tensor = tensor.to(dtype)
    return tensor.contiguous()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (a checkpoint's identity in reports and the model card)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> 'OrderedDict[str, torch.Tensor]':
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
    return OrderedDict(state_dict)


def extract_state_dict(checkpoint: Mapping, param_key: Optional[str] = None,
                       source: str = 'checkpoint') -> 'OrderedDict[str, torch.Tensor]':
    """The network weights inside a loaded checkpoint, with wrapper prefixes removed.

    ``param_key`` (e.g. BasicSR's ``param_key_g``) is used when the checkpoint has it; otherwise ``params_ema``,
    ``params``, a Lightning ``state_dict`` (``net.`` stripped) and finally the mapping itself are tried.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, expected a dict of tensors')
    key = next((k for k in (param_key, *PARAM_KEYS) if k is not None and k in checkpoint), None)
    if key is not None:
        state_dict = checkpoint[key]
    elif isinstance(checkpoint.get(LIGHTNING_KEY), Mapping):
        state_dict = _strip(checkpoint[LIGHTNING_KEY], LIGHTNING_PREFIX)
    else:
        state_dict = checkpoint
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: entry '{key}' holds a {type(state_dict).__name__}, expected a state_dict")
    for prefix in WRAPPER_PREFIXES:
        state_dict = _strip(state_dict, prefix)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{source}: entries {bad[:5]} are not tensors; is this a training state rather than '
                              'network weights? (BasicSR keeps weights in models/net_g_*.pth)')
    return state_dict


def plain_options(value):
    """``value`` with every (ordered) mapping turned into a ``dict`` and tuples into lists: the YAML scalars and
    containers that ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, Mapping):
        return {str(k): plain_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_options(v) for v in value]
    return value


def network_options(checkpoint: Mapping) -> Optional[dict]:
    """The ``network_g`` options a checkpoint of this package carries (see :data:`NETWORK_KEY`), else None."""
    options = checkpoint.get(NETWORK_KEY) if isinstance(checkpoint, Mapping) else None
    return dict(options) if isinstance(options, Mapping) and 'type' in options else None


def load_checkpoint(net: nn.Module, path: str, param_key: Optional[str] = None, strict: bool = True) -> nn.Module:
    """Load the weights in ``path`` into ``net`` (unwrapping DataParallel/DDP); returns ``net``.

    ``param_key``: the preferred entry of a BasicSR file (see ``extract_state_dict``).

    A mismatch raises ``CheckpointError`` naming the missing and unexpected keys and the shape mismatches. With
    ``strict=False`` (BasicSR's ``strict_load_g: false``) they are logged as a warning instead, as BasicSR does:
    missing keys keep their initial values, unexpected keys and tensors of another shape are skipped.
    """
    return load_weights(net, extract_state_dict(read_checkpoint(path), param_key, source=path), path, strict)


def load_weights(net: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                 strict: bool = True) -> nn.Module:
    """``net.load_state_dict`` (unwrapping DataParallel/DDP) whose mismatch raises ``CheckpointError`` naming the
    missing and unexpected keys and the shape mismatches; ``source`` names the checkpoint. Returns ``net``."""
    net = getattr(net, 'module', net)
    if not strict:
        state_dict = _lenient(net, state_dict, source)
    try:
        net.load_state_dict(state_dict, strict=strict)
    except RuntimeError as err:
        own = net.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        raise CheckpointError(
            f'{source} does not fit {type(net).__name__}: {len(missing)} missing keys {missing[:8]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:8]}. Check that network_g matches the configuration '
            f'the checkpoint was trained with. ({str(err).splitlines()[-1].strip()})') from err
    return net


#: How many keys a lenient-loading warning lists per kind.
LISTED_KEYS = 8


def _lenient(net: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str) -> 'OrderedDict[str, torch.Tensor]':
    """``state_dict`` without the tensors whose shape differs from ``net``'s, after a warning that lists those, the
    missing and the unexpected keys (nothing is logged when the checkpoint fits exactly)."""
    from basicsr.utils import get_root_logger

    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        shapes = [f'{k}: checkpoint {list(state_dict[k].shape)} vs network {list(own[k].shape)}'
                  for k in mismatched[:LISTED_KEYS]]
        get_root_logger().warning(
            f'strict_load: false: {path} does not fit {type(net).__name__} exactly: {len(missing)} missing key(s) '
            f'keep their initial values {missing[:LISTED_KEYS]}; {len(unexpected)} unexpected key(s) are ignored '
            f'{unexpected[:LISTED_KEYS]}; {len(mismatched)} tensor(s) of another shape are skipped {shapes}.')
    return OrderedDict((k, v) for k, v in state_dict.items() if k not in mismatched)
