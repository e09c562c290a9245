"""Restoring users' images with a trained checkpoint: the library behind ``python -m datprl_arch.restore``.

- Network: the ``network_g`` options a checkpoint of this package carries, or those of an option file (official
  checkpoints); weights ``params_ema``, else ``params`` (or a chosen entry), always read with ``weights_only=True``.
- Images: decoded unchanged (8/16-bit or float, gray or colour), fed to the network with its input channels (gray
  replicated for a colour network, RGB order), written back atomically in the input's bit depth and channels.
- Large images (more than ``max_pixels`` per forward, or larger than an explicit tile) are restored in blended tiles
  (:mod:`.tiling`). A network with a prompt system composes its prompt once from the whole image (a downscaled view
  when it is large) and restores every tile under that prompt (``PromptSystem.fixed_prompt``), so all tiles get the
  same domain-aware task prompt; other networks are tiled plainly.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import cv2
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from basicsr.archs import build_network
from basicsr.utils import get_root_logger, img2tensor, scandir

from ..archs.prompt import PromptSystem
from ..data.image_io import (NETWORK_CHANNELS, ImageDecodeError, decode_image, tensor_to_stored, to_channels, to_unit,
                             with_alpha, write)
from ..options import load_option_file
from ..utils.checkpoint import (NETWORK_KEY, PARAM_KEYS, CheckpointError, extract_state_dict, load_weights,
                                network_options, read_checkpoint)
from ..utils.precision import AMP_DTYPES, amp_problem, autocast, memory_format
from .prompt_control import PromptChoiceError, chosen_prompt, parse_blend
from .tiling import check_tiling, plan_tiles, tiled_apply

#: Inputs a folder is scanned for (case-insensitive).
IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg')
#: Bit depths each output format stores (OpenCV would silently write a 16-bit image into a JPEG as 8-bit).
SUFFIX_BIT_DEPTHS = {'.png': (8, 16), '.jpg': (8,), '.jpeg': (8,), '.tif': (8, 16, 32), '.tiff': (8, 16, 32)}
#: Differing network_g keys a conflict between --opt and a checkpoint names before it only counts the rest.
LISTED_OPTIONS = 6
#: Output formats that store an alpha channel (kept unchanged beside the restored colour channels).
ALPHA_SUFFIXES = ('.png', '.tif', '.tiff')
#: Largest image restored in one forward; larger ones are tiled. The 6-task network needs about 7.5 GB at
#: 1024x1024 on the CPU (docs/architecture.md, "Restoring users' images").
MAX_PIXELS_PER_FORWARD = 1024 * 1024
#: Overlap of neighbouring tiles in pixels (the outer quarter on each side of a seam is discarded, see tiling).
DEFAULT_TILE_OVERLAP = 32
#: Automatic tiles are a multiple of this, the Restormer's padding multiple, so they are not padded.
AUTO_TILE_MULTIPLE = 8
#: Longest side of the view the prompt of a tiled image is composed from (the image is downscaled to it).
PROMPT_VIEW_MAX_SIDE = 1024


class RestoreError(ValueError):
    """A restore request that cannot run (paths, checkpoint, options, device); the message says what to change."""


class ImageFailure(RuntimeError):
    """One image that could not be restored; the others go on."""


# ------------------------------------------------------------------------------------------------ paths
def plan_jobs(input_path: str, output_path: str) -> list[tuple[str, str]]:
    """``(input file, output file)`` pairs for an image or a folder INPUT; outputs keep the input file names.

    A folder INPUT needs a folder OUTPUT (created when written); a file INPUT goes to ``output_path`` itself, or into
    it when it is a folder (or ends with a separator). No output may be an input file.
    """
    if not os.path.exists(input_path):
        raise RestoreError(f'INPUT {input_path} does not exist')
    if os.path.isdir(input_path):
        names = sorted(n for n in scandir(input_path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise RestoreError(f'INPUT folder {input_path} holds no images ({", ".join(IMAGE_SUFFIXES)})')
        if os.path.exists(output_path) and not os.path.isdir(output_path):
            raise RestoreError(f'OUTPUT {output_path} is a file; a folder INPUT needs an OUTPUT folder')
        if os.path.realpath(input_path) == os.path.realpath(output_path):
            raise RestoreError(f'OUTPUT {output_path} is the INPUT folder: its images would be overwritten; '
                               'choose another OUTPUT folder')
        jobs = [(os.path.join(input_path, n), os.path.join(output_path, n)) for n in names]
    else:
        if os.path.isdir(output_path) or output_path.endswith(('/', os.sep)):
            output_file = os.path.join(output_path, os.path.basename(input_path))
        elif output_path.lower().endswith(IMAGE_SUFFIXES):
            output_file = output_path
        else:
            raise RestoreError(f'OUTPUT {output_path}: expected a folder (existing, or ending with "/") or an image '
                               f'file ({", ".join(IMAGE_SUFFIXES)})')
        jobs = [(input_path, output_file)]
    inputs = {os.path.realpath(src) for src, _ in jobs}
    clash = next((dst for _, dst in jobs if os.path.realpath(dst) in inputs), None)
    if clash is not None:
        raise RestoreError(f'OUTPUT {clash} is an input file and would be overwritten; choose another OUTPUT')
    return jobs


# ------------------------------------------------------------------------------------------------ network
def network_config(checkpoint: Mapping, ckpt_path: str, opt_file: Optional[str] = None) -> dict:
    """The ``network_g`` options of ``opt_file`` when given, else those the checkpoint carries."""
    if opt_file is not None:
        try:
            options = load_option_file(opt_file).get('network_g')
        except yaml.YAMLError as err:
            raise RestoreError(f'{opt_file} is not valid YAML: {err}') from None
        if not isinstance(options, Mapping) or 'type' not in options:
            raise RestoreError(f'{opt_file} has no network_g mapping with a type '
                               '(network_g: {type: DATPRLRestormer, ...})')
        return dict(options)
    options = network_options(checkpoint)
    if options is None:
        raise RestoreError(f'{ckpt_path} does not say which network it holds (no {NETWORK_KEY!r} entry; official '
                           'and BasicSR checkpoints have none): pass the option file it was trained or tested with, '
                           '--opt FILE.yml')
    return options


def _plain(value):
    """``value`` with tuples as lists and mappings as dicts, so options from YAML and from a checkpoint compare."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def differing_options(chosen: Mapping, carried: Mapping) -> list[str]:
    """``key: chosen vs carried`` for every top-level ``network_g`` key whose value differs (absent: ``-``)."""
    missing = object()
    lines = []
    for key in dict.fromkeys([*chosen, *carried]):
        ours, theirs = _plain(chosen.get(key, missing)), _plain(carried.get(key, missing))
        if ours != theirs:
            lines.append(f'{key}: {"-" if ours is missing else ours!r} vs {"-" if theirs is missing else theirs!r}')
    return lines


def load_network(ckpt_path: str, opt_file: Optional[str] = None, param_key: Optional[str] = None) -> nn.Module:
    """Build the checkpoint's network (BasicSR's ``build_network``) and load its weights: ``param_key`` if given
    (an error when missing), else ``params_ema``, else ``params``, else a Lightning or plain state_dict.

    When ``opt_file``'s ``network_g`` replaces one the checkpoint carries and differs from it, the differing keys
    are named: in the error when the weights then do not fit, in a warning when they do.
    """
    checkpoint = read_checkpoint(ckpt_path)
    options = network_config(checkpoint, ckpt_path, opt_file)
    carried = network_options(checkpoint) if opt_file is not None else None
    conflict = differing_options(options, carried) if carried is not None else []
    listed = '; '.join(conflict[:LISTED_OPTIONS]) + (f'; {len(conflict) - LISTED_OPTIONS} more'
                                                     if len(conflict) > LISTED_OPTIONS else '')
    where = opt_file or ckpt_path
    try:
        net = build_network(options)
    except (KeyError, TypeError, ValueError) as err:
        raise RestoreError(f'cannot build network_g (type {options["type"]!r}) of {where}: {err}') from None
    if param_key is not None and param_key not in checkpoint:
        entries = [k for k, v in checkpoint.items() if isinstance(v, Mapping)]
        raise RestoreError(f'{ckpt_path} has no weights entry {param_key!r} (it has {entries})')
    key = param_key or next((k for k in PARAM_KEYS if k in checkpoint), None)
    state_dict = extract_state_dict(checkpoint, key, source=ckpt_path)
    try:
        load_weights(net, state_dict, ckpt_path)
    except CheckpointError as err:
        if not conflict:
            raise
        detail = str(err.__cause__ or err).strip().splitlines()[-1].strip()
        raise RestoreError(f'the network_g of {opt_file} differs from the network_g that {ckpt_path} carries '
                           f'(option file vs checkpoint: {listed}), and the weights do not fit the option file\'s '
                           'network: drop --opt to restore with the network the checkpoint describes, or pass the '
                           f'option file it was trained with ({detail})') from None
    if conflict:
        get_root_logger().warning(f'the network_g of {opt_file} differs from the network_g that {ckpt_path} carries '
                                  f'(option file vs checkpoint: {listed}); the weights fit, so the option file\'s '
                                  'network is used (drop --opt to use the checkpoint\'s own).')
    get_root_logger().info(f'Restoring with {type(net).__name__} (network_g of {where}), weights '
                           f'{key or "state_dict"} of {ckpt_path}')
    return net


def input_channels(net: nn.Module) -> int:
    """The channels the network takes (its first convolution's): 1 (gray) or 3 (colour)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels not in NETWORK_CHANNELS:
        found = 'no convolution' if conv is None else f'a first convolution with {conv.in_channels} input channels'
        raise RestoreError(f'{type(net).__name__} has {found}; images are restored with 1 (gray) or 3 (colour)')
    return conv.in_channels


def resolve_device(name: Optional[str] = None, amp: Optional[str] = None) -> torch.device:
    """The device ``name`` (default: cuda when available, else cpu), checked to exist and to support ``amp``."""
    if name is None:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RestoreError(f'device {name!r} is not a device name (cpu, cuda, cuda:1, ...)') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise RestoreError(f'device {name!r}: no CUDA device is available here; use cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RestoreError(f'device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible')
    problem = amp_problem(device, amp) if amp is not None else None
    if problem:
        raise RestoreError(f'amp {amp}: {problem}' if amp in AMP_DTYPES else problem)
    return device


def auto_tile_side(max_pixels: int, overlap: int) -> int:
    """Side of the tiles of an image above ``max_pixels``: the largest multiple of :data:`AUTO_TILE_MULTIPLE`
    whose square fits ``max_pixels`` (it must exceed the overlap)."""
    side = math.isqrt(max_pixels) // AUTO_TILE_MULTIPLE * AUTO_TILE_MULTIPLE
    if side <= overlap:
        raise RestoreError(f'max_pixels {max_pixels} gives {side}-pixel tiles, which must be larger than the tile '
                           f'overlap {overlap}: raise max_pixels or lower the overlap')
    return side


def check_tiling_options(tile: Optional[int], overlap: int, max_pixels: int) -> int:
    """Check the tiling options; returns the automatic tile side (:func:`auto_tile_side`)."""
    if max_pixels < 1:
        raise RestoreError(f'max_pixels must be at least 1, got {max_pixels}')
    if tile is not None:
        try:
            check_tiling(tile, overlap)
        except ValueError as err:
            raise RestoreError(str(err)) from None
    return auto_tile_side(max_pixels, overlap)


# ------------------------------------------------------------------------------------------------ restoring
@dataclass
class Restorer:
    """A network in eval mode on ``device`` and how it is applied to one image.

    ``tile``: tile an image whose longer side exceeds it into tiles of this side; None: tile only images above
    ``max_pixels`` (into tiles of :func:`auto_tile_side`). ``overlap``: of neighbouring tiles, in pixels.
    ``prompt``: a fixed prompt for every image (:mod:`.prompt_control`); None: each image composes its own.
    """

    net: nn.Module
    device: torch.device
    amp: Optional[torch.dtype] = None
    tile: Optional[int] = None
    overlap: int = DEFAULT_TILE_OVERLAP
    max_pixels: int = MAX_PIXELS_PER_FORWARD
    prompt: Optional[torch.Tensor] = None  # [1, P]: every image under this prompt (--task, --blend)
    channels: int = field(init=False)
    memory_format: torch.memory_format = field(init=False)  # channels_last on the CPU
    auto_tile: int = field(init=False)

    def __post_init__(self):
        self.channels = input_channels(self.net)
        self.auto_tile = check_tiling_options(self.tile, self.overlap, self.max_pixels)
        self.memory_format = memory_format(self.device)
        self.net.eval().to(memory_format=self.memory_format)

    @property
    def prompted(self) -> bool:
        """Whether the network composes a prompt (has a prompt system that is switched on)."""
        return isinstance(self.net, PromptSystem) and self.net.prompt_width is not None

    def tile_side(self, height: int, width: int) -> Optional[int]:
        """Tile side for an ``height`` x ``width`` image, or None when it is restored in one forward."""
        if self.tile is not None:
            return self.tile if max(height, width) > self.tile else None
        return self.auto_tile if height * width > self.max_pixels else None

    def _autocast(self):
        return autocast(self.device, self.amp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One forward: ``[B, C, h, w]`` on any device -> float32 ``[B, C, h, w]`` on the same device."""
        with self._autocast():
            return self.net(x.to(self.device, memory_format=self.memory_format)).float().to(x.device)

    def image_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt ``[1, P]`` of the whole image ``x`` ``[1, C, H, W]``, composed from a view of at most
        :data:`PROMPT_VIEW_MAX_SIDE` on its longer side and ``max_pixels`` in area (antialiased bilinear)."""
        height, width = x.shape[-2:]
        scale = min(1.0, PROMPT_VIEW_MAX_SIDE / max(height, width), math.sqrt(self.max_pixels / (height * width)))
        if scale < 1:
            size = (max(1, int(height * scale)), max(1, int(width * scale)))
            x = F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=True)
        with self._autocast():
            return self.net.compute_prompt(x.to(self.device, memory_format=self.memory_format))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[int]]:
        """Image ``[1, C, H, W]`` (RGB, ``[0, 1]``, CPU) -> (restored float32 ``[1, C, H, W]`` on the CPU, the tile
        side used or None). Tiles of a prompted network share the whole image's prompt."""
        side = self.tile_side(*x.shape[-2:])
        if self.prompt is not None:
            shared = self.net.fixed_prompt(self.prompt)
        elif side is None:
            return self.forward(x), None
        else:
            shared = self.net.fixed_prompt(self.image_prompt(x)) if self.prompted else nullcontext()
        with shared:
            return (self.forward(x), None) if side is None else (tiled_apply(self.forward, x, side, self.overlap), side)


def load_restorer(ckpt_path: str, opt_file: Optional[str] = None, param_key: Optional[str] = None,
                  device: Optional[str] = None, amp: Optional[str] = None, tile: Optional[int] = None,
                  overlap: int = DEFAULT_TILE_OVERLAP, max_pixels: int = MAX_PIXELS_PER_FORWARD,
                  task: Optional[str] = None, blend: Optional[str] = None) -> Restorer:
    """A :class:`Restorer` for a checkpoint; the options are checked before the checkpoint is read. ``task`` or
    ``blend`` fix the prompt of every image (:mod:`.prompt_control`)."""
    torch_device = resolve_device(device, amp)
    check_tiling_options(tile, overlap, max_pixels)
    if blend is not None:
        parse_blend_or_fail(blend)
    net = load_network(ckpt_path, opt_file, param_key).to(torch_device)
    restorer = Restorer(net, torch_device, AMP_DTYPES.get(amp), tile, overlap, max_pixels)
    try:
        restorer.prompt = chosen_prompt(restorer, task, blend)
    except PromptChoiceError as err:
        raise RestoreError(str(err)) from None
    if restorer.prompt is not None:
        get_root_logger().info(f"Every image under the prompt of {'task ' + task if task else 'the blend ' + blend}")
    return restorer


def parse_blend_or_fail(blend: str) -> None:
    """Check a ``--blend`` value before any checkpoint is read."""
    try:
        parse_blend(blend)
    except PromptChoiceError as err:
        raise RestoreError(str(err)) from None


def read_image(src: str, dst: str):
    """The decoded image ``src`` (:class:`~datprl_arch.data.image_io.DecodedImage`), checked to be writable as
    ``dst`` (bit depth, alpha); ``ImageDecodeError`` or :class:`ImageFailure` name the file."""
    try:
        with open(src, 'rb') as f:
            content = f.read()
    except OSError as err:
        raise ImageFailure(f'{src}: cannot be read ({err.strerror})') from None
    decoded = decode_image(content, where=src, verify=True)
    fmt, alpha = decoded.fmt, decoded.alpha
    suffix = os.path.splitext(dst)[1].lower()
    if fmt.bit_depth not in SUFFIX_BIT_DEPTHS.get(suffix, (fmt.bit_depth,)):
        fitting = [s for s, depths in SUFFIX_BIT_DEPTHS.items() if fmt.bit_depth in depths]
        raise ImageFailure(f'{dst}: {suffix} cannot store the {fmt.bit_depth}-bit image {src}; write it as one of '
                           f'{fitting}')
    if alpha is not None and suffix not in ALPHA_SUFFIXES:
        raise ImageFailure(f'{dst}: {suffix} cannot store the alpha channel of {src}; write it as one of '
                           f'{list(ALPHA_SUFFIXES)}')
    if decoded.palette:
        colour = 'RGB' if alpha is None else 'RGBA'
        get_root_logger().info(f'{src}: palette PNG expanded to {fmt.bit_depth}-bit {colour}; the result is written '
                               'in full colour, not as a palette image')
    return decoded


def restore_tensor(restorer: Restorer, x: torch.Tensor, src: str) -> tuple[torch.Tensor, Optional[int], int]:
    """``restorer(x)`` with an out-of-memory error named: (output, tile side or None, number of tiles)."""
    try:
        y, side = restorer(x)
    except torch.cuda.OutOfMemoryError:
        raise ImageFailure(f'{src}: out of memory on {restorer.device}; use smaller tiles (tile size or '
                           'max pixels per forward)') from None
    if side is None:
        return y, None, 1
    count = len(plan_tiles(*x.shape[-2:], side, restorer.overlap))
    shared = ', all under the prompt of the whole image' if restorer.prompted else ''
    get_root_logger().info(f'{src}: {x.shape[-2]}x{x.shape[-1]} restored in {count} tiles of {side} pixels '
                           f'(overlap {restorer.overlap}){shared}')
    return y, side, count


def restore_file(restorer: Restorer, src: str, dst: str, explainer=None) -> dict:
    """Restore the image ``src`` into ``dst`` (same bit depth and channels), atomically; ``ImageDecodeError`` or
    :class:`ImageFailure` name the file when it cannot be read, restored or written. Returns the image's report
    record (file, output, tiles, seconds; with an ``explainer`` (:class:`~.guard.Explainer`) also what it detected
    and what the guard did: a kept input is written from the decoded pixels, exactly).

    An alpha channel is not restored (the network sees colour only): it is written back unchanged beside the
    restored colour channels. A palette PNG is restored and written in full colour, and said so.
    """
    decoded = read_image(src, dst)
    raw, fmt, alpha = decoded.pixels, decoded.fmt, decoded.alpha
    x = img2tensor(to_channels(to_unit(raw), restorer.channels), bgr2rgb=True, float32=True)[None]
    start = time.perf_counter()
    y, side, count = restore_tensor(restorer, x, src)
    record, kept_input = {'file': src, 'output': dst, 'tiles': count, 'tile_side': side}, False
    if explainer is not None:
        y, kept_input, explained = explainer(restorer, x, y, gray=fmt.channels == 1)
        record.update(explained)
    record['seconds'] = time.perf_counter() - start
    try:
        stored = (raw[..., 0] if raw.shape[2] == 1 else raw) if kept_input else tensor_to_stored(y, fmt)
        write(dst, stored if alpha is None else with_alpha(stored, alpha))
    except (ValueError, OSError, cv2.error) as err:
        raise ImageFailure(f'{dst}: cannot be written ({err})') from None
    return record


def restore_files(restorer: Restorer, jobs: Sequence[tuple[str, str]], progress: bool = True, explainer=None,
                  records: Optional[list] = None) -> list[str]:
    """Restore every ``(src, dst)`` pair, with a progress bar unless ``progress`` is False; an image that fails is
    logged and skipped. Returns the failure messages (each names its file); each image's report record
    (:func:`restore_file`, with ``explainer``) is appended to ``records`` when given."""
    logger = get_root_logger()
    failures = []
    with logging_redirect_tqdm(loggers=[logger]):
        for src, dst in tqdm(jobs, desc='restore', unit='image', disable=not progress):
            try:
                record = restore_file(restorer, src, dst, explainer)
                if records is not None:
                    records.append(record)
            except (ImageDecodeError, ImageFailure) as err:
                logger.error(f'skipped {err}')
                failures.append(str(err))
    logger.info(f'{len(jobs) - len(failures)} of {len(jobs)} images restored')
    return failures
