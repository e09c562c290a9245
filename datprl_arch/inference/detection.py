"""Detection of an image's domain and degradation from what the prompt system already computes, with calibrated
probabilities, and the guard thresholds that go with them: the head that ``python -m datprl_arch.tools.calibrate``
fits per checkpoint and stores in a copy of it.

Features (one row ``[F]`` per image, from the whole image as restore composes its prompt):

- ``pools`` (DATPRL's dual pools, the task-pool network, ``PromptedBackbone`` with ``DualPool``): each pool's query
  ``[D]`` and its temperature-scaled cosine similarities to every key ``[P]``, task pool first;
- ``classifier`` (the label modes ``ExplicitPrompt``, ``LowRankPrompt``): the logits of the mode's own task
  classifier ``[T]``; their probabilities are its softmax at a fitted temperature, and there is no domain;
- ``prompt`` (the other prompt modes): the composed prompt ``[P]``.

The head is a multinomial logistic regression per label kind (domain, task) on standardised features with a
temperature (:class:`LinearHead`); it is stored as plain numbers (a ``.pth`` entry, or JSON in a ``.safetensors``
header), so it survives a round trip exactly and needs no pickle.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from ..archs.prompt import PromptState, PromptSystem
from ..errors import DatprlError
from ..utils.atomic import atomic_torch_save
from ..utils.checkpoint import (LIGHTNING_KEY, METADATA_KEY, NETWORK_KEY, PARAM_KEYS, SAFETENSORS_PARAM_KEY,
                                extract_state_dict, read_checkpoint, save_safetensors)
from ..weights import resolve_checkpoint

#: Entry of a ``.pth`` checkpoint, and metadata key of a ``.safetensors`` one, that holds the detection head.
HEAD_KEY = 'detection_head'
#: Version of the stored head's layout (a head of another version is refused with a message).
HEAD_VERSION = 1
#: Feature kinds (see the module docstring).
POOLS, CLASSIFIER, PROMPT = 'pools', 'classifier', 'prompt'
FEATURE_KINDS = (POOLS, CLASSIFIER, PROMPT)
#: Label kinds a head detects, in report order.
LABEL_KINDS = ('domain', 'task')
#: Smallest feature standard deviation used for standardising (constant features are left centred, not blown up).
MIN_FEATURE_STD = 1e-6


class DetectionError(DatprlError, ValueError):
    """A network, checkpoint or head that cannot detect; the message says what to change."""


# ------------------------------------------------------------------------------------------------ features
def feature_kind(net: nn.Module) -> str:
    """The feature kind ``net`` offers (:data:`FEATURE_KINDS`); a network without prompts is a ``DetectionError``."""
    if not isinstance(net, PromptSystem) or net.prompt_width is None:
        raise DetectionError(f'{type(net).__name__} has no prompt system (or was built with use_prompt: false): '
                             'there is nothing to detect the domain and task from')
    mode = getattr(net, 'prompt_mode', None)
    if mode is None:
        return POOLS
    if getattr(mode, 'task_names', ()):
        return CLASSIFIER
    return PROMPT


def state_features(state, kind: str) -> torch.Tensor:
    """One retrieval's features ``[B, F]`` (float32) of ``kind``: a :class:`PromptState` (pools) or a prompt mode's
    state (classifier logits, prompt)."""
    if kind == POOLS:
        if not isinstance(state, PromptState):
            raise DetectionError(f'pool features need a PromptState, got {type(state).__name__}')
        parts = [state.task_query, state.task.logits]
        if state.domain is not None:
            parts += [state.domain_query, state.domain.logits]
        return torch.cat([p.float() for p in parts], dim=1)
    if kind == CLASSIFIER:
        logits = getattr(state, 'task_logits', None)
        if logits is None:
            raise DetectionError('the prompt mode ran no task classifier (classifier_weight: 0?): it has no task '
                                 'probabilities to calibrate')
        return logits.float()
    return state.prompt.float()


# ------------------------------------------------------------------------------------------------ the head
@dataclass
class LinearHead:
    """Class probabilities ``softmax((z W^T + b) / T)`` of standardised features ``z`` ``[B, F]``; ``weight``
    ``[K, F]`` None means the features are the logits themselves (a classifier's)."""

    classes: list
    weight: Optional[torch.Tensor]  # [K, F] float64, or None
    bias: Optional[torch.Tensor]  # [K] float64, or None
    temperature: float = 1.0

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``[B, F]`` -> uncalibrated logits ``[B, K]`` (float64)."""
        z = z.double()
        return z if self.weight is None else z @ self.weight.T + self.bias

    def probabilities(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``[B, F]`` -> calibrated probabilities ``[B, K]`` (float64)."""
        return (self.logits(z) / self.temperature).softmax(dim=-1)

    def to_dict(self) -> dict:
        return {'classes': list(self.classes), 'temperature': float(self.temperature),
                'weight': None if self.weight is None else self.weight.tolist(),
                'bias': None if self.bias is None else self.bias.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> LinearHead:
        weight = None if data.get('weight') is None else torch.tensor(data['weight'], dtype=torch.float64)
        bias = None if data.get('bias') is None else torch.tensor(data['bias'], dtype=torch.float64)
        head = cls(list(data['classes']), weight, bias, float(data['temperature']))
        count = len(head.classes)
        if weight is not None and (weight.ndim != 2 or weight.shape[0] != count or bias is None
                                   or tuple(bias.shape) != (count,)):
            raise DetectionError(f'{where}: weight {list(weight.shape)} and bias do not fit {count} classes')
        if not head.temperature > 0:
            raise DetectionError(f'{where}: temperature must be > 0, got {head.temperature}')
        return head


@dataclass
class GuardThresholds:
    """When the guard steps in: task confidence below ``min_confidence``; a change (PSNR of the output against the
    input, dB) below ``change_db[task][0]``, the largest change the network makes on validation images of that
    task less a margin (``change_db[task][1]`` is the smallest change plus the margin, reported only)."""

    min_confidence: float
    change_db: dict  # task -> [low, high]

    def to_dict(self) -> dict:
        return {'min_confidence': float(self.min_confidence),
                'change_db': {t: [float(v) for v in r] for t, r in self.change_db.items()}}


@dataclass
class DetectionHead:
    """A checkpoint's detection head: feature kind and standardisation, a :class:`LinearHead` per label kind
    (``domain`` may be None), the guard thresholds and how it was fitted (``fit``: provenance and figures)."""

    kind: str
    mean: torch.Tensor  # [F] float64
    std: torch.Tensor  # [F] float64
    heads: dict  # label kind -> LinearHead or None
    guard: GuardThresholds
    fit: dict = field(default_factory=dict)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``[B, F]`` -> standardised ``[B, F]`` float64; a width other than the fitted one is refused."""
        if features.ndim != 2 or features.shape[1] != self.mean.numel():
            raise DetectionError(f'the network gives {features.shape[-1]} features, the detection head was fitted '
                                 f'on {self.mean.numel()}: it belongs to another network')
        return (features.double().cpu() - self.mean) / self.std

    def predict(self, features: torch.Tensor) -> dict:
        """Features ``[B, F]`` -> ``{label kind: probabilities [B, K]}`` for the kinds this head detects."""
        z = self.standardise(features)
        return {kind: head.probabilities(z) for kind, head in self.heads.items() if head is not None}

    def classes(self, kind: str) -> list:
        head = self.heads.get(kind)
        return [] if head is None else list(head.classes)

    def to_dict(self) -> dict:
        """Plain numbers, strings, lists and dicts: what ``torch.load(weights_only=True)`` and JSON both hold."""
        return {'version': HEAD_VERSION, 'features': self.kind, 'mean': self.mean.tolist(), 'std': self.std.tolist(),
                'heads': {k: None if h is None else h.to_dict() for k, h in self.heads.items()},
                'guard': self.guard.to_dict(), 'fit': dict(self.fit)}

    @classmethod
    def from_dict(cls, data: Mapping, where: str = 'detection head') -> DetectionHead:
        """The head stored by :meth:`to_dict`; a missing key or another layout is a ``DetectionError`` naming
        ``where`` (the checkpoint)."""
        if not isinstance(data, Mapping):
            raise DetectionError(f'{where}: {HEAD_KEY!r} holds a {type(data).__name__}, expected a mapping')
        if data.get('version') != HEAD_VERSION:
            raise DetectionError(f'{where}: detection head version {data.get("version")!r}, this package reads '
                                 f'version {HEAD_VERSION}: calibrate the checkpoint again')
        try:
            kind = data['features']
            if kind not in FEATURE_KINDS:
                raise DetectionError(f'{where}: features {kind!r}, expected one of {FEATURE_KINDS}')
            heads = {k: None if data['heads'].get(k) is None else
                     LinearHead.from_dict(data['heads'][k], f'{where}, {k} head') for k in LABEL_KINDS}
            guard = GuardThresholds(float(data['guard']['min_confidence']),
                                    {t: list(r) for t, r in data['guard']['change_db'].items()})
            mean = torch.tensor(data['mean'], dtype=torch.float64)
            std = torch.tensor(data['std'], dtype=torch.float64)
        except (KeyError, TypeError) as err:
            raise DetectionError(f'{where}: the detection head lacks or mangles {err} ({HEAD_KEY!r} entry)') from None
        if heads['task'] is None:
            raise DetectionError(f'{where}: the detection head has no task head')
        if mean.shape != std.shape or mean.ndim != 1:
            raise DetectionError(f'{where}: mean {list(mean.shape)} and std {list(std.shape)} must be one vector')
        return cls(kind, mean, std, heads, guard, dict(data.get('fit') or {}))


# ------------------------------------------------------------------------------------------------ checkpoints
def head_of(checkpoint: Mapping, where: str) -> Optional[DetectionHead]:
    """The head a read checkpoint carries (a ``.pth`` entry or ``.safetensors`` metadata), else None."""
    if not isinstance(checkpoint, Mapping):
        return None
    stored = checkpoint.get(HEAD_KEY)
    metadata = checkpoint.get(METADATA_KEY)
    if stored is None and isinstance(metadata, Mapping) and HEAD_KEY in metadata:
        try:
            stored = json.loads(metadata[HEAD_KEY])
        except ValueError as err:
            raise DetectionError(f'{where}: metadata {HEAD_KEY!r} is not JSON ({err})') from None
    return None if stored is None else DetectionHead.from_dict(stored, where)


def read_head(ckpt_path: str) -> Optional[DetectionHead]:
    """The detection head stored in the checkpoint ``ckpt_path`` (``release``: the shipped model), else None."""
    return head_of(read_checkpoint(ckpt_path), ckpt_path)


def save_with_head(src: str, dst: str, head: DetectionHead, network: Mapping) -> None:
    """Write a copy of checkpoint ``src`` with ``head`` to ``dst``, atomically; ``src`` is never modified.

    ``.pth``/``.ckpt``: every entry of ``src`` plus :data:`HEAD_KEY` (and ``network_g`` when ``src`` carries none;
    a bare state_dict becomes the ``params`` entry).
    ``.safetensors``: the same tensors and header metadata, plus the head as JSON under :data:`HEAD_KEY`.
    """
    src = resolve_checkpoint(src)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise DetectionError(f'--out {dst} is the input checkpoint, which is never modified: choose another file')
    checkpoint = read_checkpoint(src)
    src_safetensors, dst_safetensors = src.endswith('.safetensors'), dst.endswith('.safetensors')
    if dst_safetensors != src_safetensors:
        wanted = '.safetensors' if src_safetensors else '.pth'
        raise DetectionError(f'--out {dst}: keep the format of {src} (a {wanted} file), so that everything it holds '
                             'is copied')
    if dst_safetensors:
        tensors = extract_state_dict(checkpoint, SAFETENSORS_PARAM_KEY, source=src)
        metadata = {k: str(v) for k, v in (checkpoint.get(METADATA_KEY) or {}).items() if k != NETWORK_KEY}
        metadata[HEAD_KEY] = json.dumps(head.to_dict())
        save_safetensors(tensors, dst, checkpoint.get(NETWORK_KEY) or network, metadata)
        return
    weights = (*PARAM_KEYS, LIGHTNING_KEY)
    copy = dict(checkpoint) if any(k in checkpoint for k in weights) else {PARAM_KEYS[-1]: dict(checkpoint)}
    copy.setdefault(NETWORK_KEY, dict(network))
    copy[HEAD_KEY] = head.to_dict()
    atomic_torch_save(copy, dst)


# ------------------------------------------------------------------------------------------------ one image
#: Peak of the network's images (``[0, 1]``) for the change PSNR.
UNIT_PEAK = 1.0
#: Luma weights of R, G, B (ITU-R BT.601, as OpenCV's BGR2GRAY that writes a gray image's result).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def change_psnr(output: torch.Tensor, image: torch.Tensor, gray: bool = False) -> float:
    """How much a restoration changed an image: PSNR (dB, peak 1) of ``output`` clamped to ``[0, 1]`` against the
    input ``image`` (both ``[1, C, H, W]``, RGB); with ``gray``, of their luma (what a gray image's result stores);
    ``inf`` when nothing changed."""
    difference = output.float().clamp(0, 1) - image.float()
    if gray and difference.shape[1] == len(LUMA_WEIGHTS):
        difference = (difference * torch.tensor(LUMA_WEIGHTS).view(1, -1, 1, 1)).sum(1)
    mse = float(difference.pow(2).mean())
    return float('inf') if mse == 0 else float(10 * torch.log10(torch.tensor(UNIT_PEAK ** 2 / mse)))


@torch.inference_mode()
def image_features(restorer, image: torch.Tensor, kind: str) -> torch.Tensor:
    """Features ``[1, F]`` (CPU) of ``image`` ``[1, C, H, W]`` from the prompt the restorer composes for the whole
    image (:meth:`~datprl_arch.inference.restore.Restorer.image_prompt`: a downscaled view of a large image)."""
    restorer.image_prompt(image)
    return state_features(restorer.net.prompt_state, kind).cpu()
