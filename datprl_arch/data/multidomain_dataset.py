"""Multi-domain paired dataset: many LQ/GT sources (disk or LMDB) behind one BasicSR dataset.

Registered as ``DATPRLMultiDomainDataset`` and under the official names ``MultiDatasetPairedImageDataset`` and
``MultiTaskAllInOneDataset``, whose option files it reads unchanged.

Options (the dataset entry of a BasicSR option file)::

    type: DATPRLMultiDomainDataset
    datasets:                       # one entry per source
      - name: rain_natural          # unique
        domain: natural             # required under our name; official alias: one shared domain
        task: derain                # required under our name; official alias: the source name
        dataroot_gt: datasets/.../gt   # folder, or .lmdb with io_backend lmdb
        dataroot_lq: datasets/.../lq
        io_backend: {type: disk}    # disk | lmdb
        meta_info_file: ~           # optional list of GT names (disk)
        filename_tmpl: '{}'         # LQ stem from GT stem
        augment_factor: 1           # repeats of the source in one epoch (official semantics)
        weight: 1.0                 # share of every training batch (relative)
        scale: 1                    # GT size = LQ size * scale
        upsample_lq: false          # bicubically upsample LQ to GT size (scale-1 networks on x2/x4 SR data)
        descriptions: ~             # JSON {image name: text}
        mode: paired                # or noise: no dataroot_lq; LQ = GT + N(0, sigma/255), fresh per training crop
        sigma: ~                    # mode noise: std on the 0-255 scale (e.g. 15, 25, 50)
                                    # or synth: no dataroot_lq; LQ = a degradation of the GT, fresh per training crop
        degradation: ~              # mode synth: {type: rain, length: [8, 40], ...} (datprl_arch.data.degradations)
    gt_size: 128                    # training crop (GT pixels)
    photometric: ~                  # synth/noise sources: GT jitter before degrading, e.g. {brightness: 0.1,
                                    #   contrast: 0.15, gamma: 0.2, saturation: 0.2} (largest relative changes)
    use_hflip: true
    use_rot: true
    channels: 3                     # channels the network sees: gray is replicated, colour converted to luma
    sampling: balanced              # or concat (official, unbalanced)
    sampling_seed: ~                # default: torch.initial_seed(), i.e. manual_seed + rank under BasicSR
    domains: ~                      # optional fixed label vocabularies (keep train and val labels identical)
    tasks: ~
    verify_images: true             # check PNG checksums / JPEG ends of every file up front
    color: ~                        # 'y': Y channel only (official)
    mean: ~
    std: ~

Each item: ``lq``, ``gt`` (``(C, H, W)`` float32 in ``[0, 1]``, RGB), ``lq_path``, ``gt_path``, integer ``source``,
``domain``, ``task`` labels and their names, ``description``, and the LQ's stored ``bit_depth`` and ``channels`` so
results can be written back in the input format (:func:`datprl_arch.data.image_io.tensor_to_stored`, used by the
model's validation).
Training batches are balanced across sources by weight (:mod:`datprl_arch.data.sampling`).
"""
from __future__ import annotations

import os
import random
import weakref
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils import data
from torchvision.transforms.functional import normalize

from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import FileClient, bgr2ycbcr, img2tensor
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import DATASET_REGISTRY
from datprl_arch.utils.registry import register

from ..utils.problems import Problems
from .degradations import DEGRADATIONS, SR_SCALE, degrade
from .image_io import DTYPE_RANGE, NETWORK_CHANNELS, decode_raw, to_channels, to_unit
from .sampling import SAMPLING_MODES, BalancedSchedule
from .sources import Source, build_source, dataset_problems, format_warnings, parse_source

#: Type names under which option files written for the official code reach this dataset.
OFFICIAL_NAMES = ('MultiDatasetPairedImageDataset', 'MultiTaskAllInOneDataset')
#: Domain given to every source of an official option file (those have no ``domain`` key).
SHARED_DOMAIN = 'shared'
_training_set: Optional[weakref.ref] = None  # see training_set()
#: Extra LQ pixels kept around a crop before bicubic upsampling, covering the 4-tap kernel exactly.
UPSAMPLE_MARGIN = 3
#: Noise ``sigma`` (mode 'noise') is given on this scale (8-bit intensities), as in the denoising literature.
NOISE_SCALE = 255.0
#: Seed of the repeatable noise of validation/test items (mode 'noise'), mixed with source and item.
NOISE_EVAL_SEED = 2026
#: Seeds are folded into this range (numpy seed sequences take non-negative integers).
SEED_MASK = (1 << 63) - 1
#: Photometric jitter of synthesised training crops: the accepted keys (largest relative change of each).
PHOTOMETRIC_KEYS = ('brightness', 'contrast', 'gamma', 'saturation')


def photometric_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.0, contrast: float = 0.0,
                       gamma: float = 0.0, saturation: float = 0.0) -> np.ndarray:
    """Random brightness, contrast, gamma and (colour images) saturation change of a float ``(H, W, C)`` image in
    ``[0, 1]``; each factor is drawn uniformly within ``1 +- value``. Applied to the GT before degrading, so GT and LQ
    stay consistent."""
    out = img ** np.float32(rng.uniform(1 - gamma, 1 + gamma))
    mean = out.mean()
    out = (out - mean) * np.float32(rng.uniform(1 - contrast, 1 + contrast)) + mean
    out = out * np.float32(rng.uniform(1 - brightness, 1 + brightness))
    if out.shape[2] == 3 and saturation:
        gray = out.mean(axis=2, keepdims=True)
        out = gray + (out - gray) * np.float32(rng.uniform(1 - saturation, 1 + saturation))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def synth_crop(gt: np.ndarray, gt_size: int, kind: str, params: dict, rng: np.random.Generator,
               photometric: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """A random ``gt_size`` training pair synthesised from stored GT pixels ``(H, W, C)``.

    The crop is cut with the degradation's context margin (so blur kernels and streaks see real pixels, not a
    border), jittered photometrically, degraded with fresh random parameters, then the margin is removed.
    """
    h, w = gt.shape[:2]
    margin = min(DEGRADATIONS[kind].margin, (min(h, w) - gt_size) // 2 // SR_SCALE * SR_SCALE)
    side = gt_size + 2 * margin
    top, left = random.randint(0, h - side), random.randint(0, w - side)
    crop = to_unit(gt[top:top + side, left:left + side])
    if photometric:
        crop = photometric_jitter(crop, rng, **photometric)
    gt_out, lq = degrade(kind, crop, rng, params)
    inner = (slice(margin, margin + gt_size), slice(margin, margin + gt_size))
    return gt_out[inner], lq[inner]


def add_noise(img: np.ndarray, sigma: float, bit_depth: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """``img`` (float ``[0, 1]``) plus Gaussian noise of std ``sigma`` on the 0-255 scale, clipped and quantised to
    the stored bit depth (the official loader adds noise to uint8 crops). ``rng=None`` draws from NumPy's global
    state, which BasicSR seeds per worker; a fixed ``rng`` makes validation/test noise repeatable."""
    normal = np.random.standard_normal if rng is None else rng.standard_normal
    noisy = np.clip(img + normal(img.shape).astype(np.float32) * np.float32(sigma / NOISE_SCALE), 0, 1)
    levels = {8: DTYPE_RANGE[np.dtype(np.uint8)], 16: DTYPE_RANGE[np.dtype(np.uint16)]}.get(bit_depth)
    return (np.round(noisy * levels) / levels).astype(np.float32) if levels else noisy


def upsample(img: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic ``scale``x upsampling of ``(H, W, C)`` float, clipped to ``[0, 1]`` like a stored image."""
    h, w, c = img.shape
    out = cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC).reshape(h * scale, w * scale, c)
    return np.clip(out, 0.0, 1.0)


def crop_upsampled(gt: np.ndarray, lq: np.ndarray, gt_size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ``gt_size`` crop of GT and of the bicubically upsampled LQ, upsampling only the needed LQ region.

    Identical to upsampling the whole LQ first (a margin of :data:`UPSAMPLE_MARGIN` LQ pixels covers the kernel).
    ``gt`` is ``(H*scale, W*scale, C)``, ``lq`` is ``(H, W, C)``, stored pixels or float; both outputs are float32
    ``(gt_size, gt_size, C)`` in ``[0, 1]``.
    """
    top, left = random.randint(0, gt.shape[0] - gt_size), random.randint(0, gt.shape[1] - gt_size)
    y0, x0 = max(0, top // scale - UPSAMPLE_MARGIN), max(0, left // scale - UPSAMPLE_MARGIN)
    y1 = min(lq.shape[0], (top + gt_size) // scale + UPSAMPLE_MARGIN + 1)
    x1 = min(lq.shape[1], (left + gt_size) // scale + UPSAMPLE_MARGIN + 1)
    up = upsample(to_unit(lq[y0:y1, x0:x1]), scale)
    oy, ox = top - y0 * scale, left - x0 * scale
    return to_unit(gt[top:top + gt_size, left:left + gt_size]), up[oy:oy + gt_size, ox:ox + gt_size]


def _vocabulary(names: list[str], fixed: Optional[list], kind: str, problems: Problems) -> list[str]:
    if fixed is None:
        return list(dict.fromkeys(names))
    fixed = [str(v) for v in fixed]
    for name in dict.fromkeys(names):
        if name not in fixed:
            problems.add(kind, f'{kind[:-1]} {name!r} is not in the declared {kind} list {fixed}.')
    return fixed


def _where(src: Source, role: str, key: str) -> str:
    """How errors name one image: the file, or the LMDB and its key."""
    if src.backend == 'lmdb':
        return f"[{src.name}] {role} LMDB {src.dataroot_gt if role == 'GT' else src.dataroot_lq}, key {key!r}"
    return f'[{src.name}] {role} {key}'


def label_warnings(train_set, val_sets) -> list[str]:
    """Domain/task names of validation sets that the training set does not have, when the two do not declare the
    same ``domains:`` / ``tasks:`` lists (each set then numbers its own names, and a typo splits the per-domain
    report silently). Datasets of other types are skipped."""
    if not isinstance(train_set, DATPRLMultiDomainDataset):
        return []
    warnings = []
    for val_set in val_sets:
        if not isinstance(val_set, DATPRLMultiDomainDataset):
            continue
        for kind in ('domains', 'tasks'):
            declared = train_set.opt.get(kind), val_set.opt.get(kind)
            if declared[0] is not None and declared[0] == declared[1]:
                continue
            unknown = [n for n in getattr(val_set, kind) if n not in getattr(train_set, kind)]
            if unknown:
                train_name, known = train_set.opt.get('name'), getattr(train_set, kind)
                warnings.append(f"validation set '{val_set.opt.get('name')}': {kind[:-1]} name(s) {unknown} do not "
                                f"occur in the training set '{train_name}' ({known}), and the two do not declare the "
                                f'same `{kind}:` list. A typo? Declare the same `{kind}:` list in every dataset to '
                                'make such names an error.')
    return warnings


def training_set() -> Optional['DATPRLMultiDomainDataset']:
    """The training set built last in this process (BasicSR builds it before the model), for ``train.stages``."""
    return _training_set() if _training_set is not None else None


@register(DATASET_REGISTRY, aliases=OFFICIAL_NAMES)
class DATPRLMultiDomainDataset(data.Dataset):
    """Paired LQ/GT images from many sources, each labelled with its source, domain and task (see module doc)."""

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        self.phase = opt.get('phase', 'train')
        self.train = self.phase == 'train'
        name = opt.get('name', opt.get('type', 'dataset'))
        official = opt.get('type') in OFFICIAL_NAMES
        self.channels = int(opt.get('channels', 3))
        self.mean, self.std = opt.get('mean'), opt.get('std')
        problems = dataset_problems(name)
        if self.channels not in NETWORK_CHANNELS:
            problems.add('channels', f'channels must be one of {NETWORK_CHANNELS}, got {opt.get("channels")!r}.')
        photometric = opt.get('photometric') or {}
        if not isinstance(photometric, dict) or not all(
                k in PHOTOMETRIC_KEYS and isinstance(v, (int, float)) and 0 <= v < 1 for k, v in photometric.items()):
            problems.add('photometric', f'photometric must map some of {PHOTOMETRIC_KEYS} to numbers in [0, 1), '
                         f'got {photometric!r}.')
        self.photometric = photometric
        if opt.get('sampling', 'balanced') not in SAMPLING_MODES:
            problems.add('sampling', f'sampling must be one of {SAMPLING_MODES}, got {opt.get("sampling")!r}.')
        entries = opt.get('datasets')
        if not isinstance(entries, list) or not entries:
            problems.add('datasets', 'expected a non-empty list of sources (name, domain, task, dataroot_gt, '
                         'dataroot_lq, io_backend, ...).')
            problems.raise_if_any()
        parsed = [parse_source(e, i, problems, official) for i, e in enumerate(entries)]
        names = [p['name'] for p in parsed if p is not None]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.add(dup, 'source names must be unique.')
        if self.train and not opt.get('gt_size'):
            problems.add('gt_size', 'training needs gt_size (the GT crop side in pixels, e.g. 128).')
        crop = int(opt['gt_size']) if self.train and opt.get('gt_size') else None
        verify = bool(opt.get('verify_images', True))
        defaults = {'domain': SHARED_DOMAIN}
        self.sources: list[Source] = [build_source(p, problems, crop, verify, defaults) for p in parsed
                                      if p is not None]
        if len({s.out_scale for s in self.sources}) > 1:
            problems.add('scale', 'all sources must give LQ and GT at the same ratio; set upsample_lq: true on the '
                         f'SR sources (ratios: { {s.name: s.out_scale for s in self.sources} }).')
        self.domains = _vocabulary([s.domain for s in self.sources], opt.get('domains'), 'domains', problems)
        self.tasks = _vocabulary([s.task for s in self.sources], opt.get('tasks'), 'tasks', problems)
        problems.raise_if_any()
        self.scale = self.sources[0].out_scale
        self.rank, _ = get_dist_info()
        seed = opt.get('sampling_seed')
        self.seed = (torch.initial_seed() if seed is None else int(seed)) & SEED_MASK
        self.schedule = BalancedSchedule([len(s.pairs) for s in self.sources], [s.weight for s in self.sources],
                                         [s.augment_factor for s in self.sources], self.seed, self.rank,
                                         opt.get('sampling', 'balanced'))
        self.offsets = np.cumsum([0] + [len(s.pairs) for s in self.sources])
        self._clients: dict[int, tuple[int, FileClient]] = {}
        #: The sources the current training stage draws from (``set_stage_tasks``); in shared memory, so the
        #: loader's worker processes see a change made in the main process.
        self.stage_sources = torch.ones(len(self.sources), dtype=torch.bool).share_memory_()
        self._log_summary(name, official)
        if self.train:
            global _training_set
            _training_set = weakref.ref(self)

    def set_stage_tasks(self, tasks: Optional[Sequence[str]]) -> None:
        """Draw training batches only from the sources of ``tasks`` (None: every source), for ``train.stages``.
        Batches the loader has already prepared keep their sources (at most ``num_worker_per_gpu`` x
        ``prefetch_factor`` batches after a change)."""
        if tasks is None:
            self.stage_sources.fill_(True)
            return
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f'train.stages: task {unknown[0]!r} is not a task of the training set '
                             f'(its tasks: {self.tasks})')
        if self.schedule.mode != 'balanced':
            raise ValueError("train.stages with tasks needs the training set's sampling: balanced")
        self.stage_sources.copy_(torch.tensor([s.task in tasks for s in self.sources]))

    def _log_summary(self, name: str, official: bool) -> None:
        from basicsr.utils import get_root_logger
        logger = get_root_logger()
        if official:
            logger.info(f"Dataset '{name}' uses an official option file (type {self.opt.get('type')}): sources "
                        f"without 'task' use their name as task, without 'domain' the shared domain "
                        f"'{SHARED_DOMAIN}'.")
        logger.info(f"Dataset '{name}' label vocabularies: domains {dict(enumerate(self.domains))}; "
                    f'tasks {dict(enumerate(self.tasks))}.')
        batch = self.opt.get('batch_size_per_gpu', 0)
        for idx, (src, prob) in enumerate(zip(self.sources, self.schedule.probs)):
            quota = f', {batch * prob:.2f} per batch of {batch}' if self.train and batch else ''
            logger.info(f'  source {idx} {src.name}: domain {src.domain}, task {src.task}, {len(src.pairs)} pairs '
                        f'({src.backend}), share {prob:.3f}{quota}.')
            for warning in format_warnings(src):
                logger.warning(f"Dataset '{name}', {warning}")

    def __len__(self) -> int:
        return len(self.schedule) if self.train else int(self.offsets[-1])

    def _client(self, source_idx: int) -> FileClient:
        """One FileClient per source and process (workers never reuse a handle inherited through fork)."""
        pid, client = self._clients.get(source_idx, (None, None))
        if pid != os.getpid():
            src = self.sources[source_idx]
            client = FileClient(src.backend, **src.file_client_opt())
            self._clients[source_idx] = (os.getpid(), client)
        return client

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, item)`` of a single index: the schedule in training, a flat enumeration otherwise."""
        if self.train:
            return self.schedule.draw(index)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} pairs.')
        source = int(np.searchsorted(self.offsets, index, side='right')) - 1
        return source, index - int(self.offsets[source])

    def __getitem__(self, index: int) -> dict:
        return self.load(*self.locate(int(index)))

    def __getitems__(self, indices: list) -> list[dict]:
        """A whole batch (PyTorch's fetcher calls this with one batch's indices): balanced in training."""
        if not self.train:
            return [self[i] for i in indices]
        active = self.stage_sources.numpy()
        return [self.load(s, i) for s, i in self.schedule.draw_batch([int(i) for i in indices], active)]

    def load(self, source_idx: int, item: int) -> dict:
        """Read, crop/augment (training) and convert pair ``item`` of source ``source_idx``."""
        src = self.sources[source_idx]
        pair = src.pairs[item]
        client = self._client(source_idx)
        gt, gt_fmt = decode_raw(client.get(pair.gt, 'gt'), _where(src, 'GT', pair.gt))
        if src.generated:  # the LQ is made from the (cropped) GT below
            lq, lq_fmt = gt, gt_fmt
        else:
            lq, lq_fmt = decode_raw(client.get(pair.lq, 'lq'), _where(src, 'LQ', pair.lq))
        s = src.scale
        gt = gt[:lq.shape[0] * s, :lq.shape[1] * s]
        if self.train:  # crop the stored pixels first: converting the whole image would be wasted work
            gt_size = int(self.opt['gt_size'])
            if src.degradation is not None:
                gt, lq = synth_crop(gt, gt_size, src.degradation['type'], src.degradation_params,
                                    np.random.default_rng(random.getrandbits(63)), self.photometric)
            elif src.upsample_lq and s > 1:
                gt, lq = crop_upsampled(gt, lq, gt_size, s)
            else:
                gt, lq = paired_random_crop(gt, lq, gt_size, s, pair.gt)
                gt, lq = to_unit(gt), to_unit(lq)
                if src.noise_sigma and self.photometric:
                    gt = lq = photometric_jitter(gt, np.random.default_rng(random.getrandbits(63)), **self.photometric)
            gt, lq = to_channels(gt, self.channels), to_channels(lq, self.channels)
            gt, lq = augment([gt, lq], self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
            gt, lq = gt.reshape(gt.shape[0], gt.shape[1], -1), lq.reshape(lq.shape[0], lq.shape[1], -1)
        else:
            gt, lq = to_unit(gt), to_unit(lq)
            if src.degradation is not None:  # repeatable per item, like the noise of 'noise' sources
                gt, lq = degrade(src.degradation['type'], gt, np.random.default_rng(
                    (NOISE_EVAL_SEED, source_idx, item)), src.degradation_params)
            gt, lq = to_channels(gt, self.channels), to_channels(lq, self.channels)
            if src.upsample_lq and s > 1:
                lq = upsample(lq, s)
        if src.noise_sigma:
            lq = add_noise(gt, src.noise_sigma, lq_fmt.bit_depth, None if self.train else
                           np.random.default_rng((NOISE_EVAL_SEED, source_idx, item)))
        if self.opt.get('color') == 'y' and self.channels == 3:
            gt, lq = bgr2ycbcr(gt, y_only=True)[..., None], bgr2ycbcr(lq, y_only=True)[..., None]
        gt, lq = img2tensor([np.ascontiguousarray(gt), np.ascontiguousarray(lq)], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(lq, self.mean, self.std, inplace=True)
            normalize(gt, self.mean, self.std, inplace=True)
        return {
            'lq': lq, 'gt': gt, 'lq_path': pair.lq, 'gt_path': pair.gt,
            'source': source_idx, 'domain': self.domains.index(src.domain), 'task': self.tasks.index(src.task),
            'source_name': src.name, 'domain_name': src.domain, 'task_name': src.task,
            'dataset_name': src.name, 'dataset_idx': source_idx,
            'description': src.descriptions.get(pair.name, ''),
            'bit_depth': lq_fmt.bit_depth, 'channels': lq_fmt.channels,
        }
