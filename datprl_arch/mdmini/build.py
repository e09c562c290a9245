"""Build MD-Mini into a folder: training GT pools, fixed val/test pairs per source, the unseen check, descriptions,
option-file fragments and a manifest.

Layout (``out`` = ``datasets/md_mini`` by default)::

    train/<pool>/gt.lmdb (+ gt/)          clean training blocks of a pool; the dataset synthesises the LQ per crop
    <source>/{val,test}/{gt,lq}.lmdb      fixed pairs (+ the same images as PNG folders)
    <source>/descriptions.json            template descriptions of every image the source uses
    unseen/<source>/{gt,lq}.lmdb          the out-of-sample check: images MD-Mini never uses, other parameters
    options_{train,test,unseen}.yml       option-file fragments listing all of it
    manifest.json                         settings, where every block came from, every file this build wrote

The build goes to ``<out>.partial-<pid>`` and is renamed at the end; a finished build with the same settings is
reused. ``overwrite`` replaces only a previous MD-Mini build, and only when every file and folder in its tree is
one the build wrote (its manifest lists them); a tree holding anything else, at any depth, is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import posixpath
import shutil
from typing import Optional, Sequence

import cv2
import numpy as np

from ..data import degradations as deg
from ..data.image_io import ImageFormat, to_stored
from ..data.lmdb.meta import BUILD_FILE, META_FILE
from ..data.lmdb.writer import folder_items, make_paired_lmdb, write_lmdb
from ..utils.debris import remove, stale_debris
from .images import POOLS, UNSEEN_POOLS
from .split import HELD_OUT_IMAGES, SPLITS, Block, blocks, held_out_side, limit_blocks, split_pool
from .tasks import CLEAN_TASKS, CLEAN_WEIGHT, DOMAIN_WORDS, DOMAINS, POOL_DOMAIN, TASKS, Task

#: Bump when the generated content changes, so older builds are not reused.
FORMAT_VERSION = 8
DEFAULT_OUT = osp.join('datasets', 'md_mini')
#: Training blocks kept per pool (a seeded choice among them).
DEFAULT_LIMIT = 128
#: The fewest training blocks per pool a build accepts.
MIN_LIMIT = 1
#: PNG level of LMDB values: 0 stores unfiltered raw blocks (still PNG, readable by BasicSR) that decode several
#: times faster than compressed ones; the folders stay compressed.
LMDB_COMPRESS_LEVEL = 0
#: Files that tools derive from a build inside its folder (replaced with it).
DERIVED_FILES = ('texts.pt',)
UNSEEN_DIR, TRAIN_DIR = 'unseen', 'train'
MANIFEST = 'manifest.json'
#: Option-file fragments every build writes (``options_<kind>.yml``).
FRAGMENT_KINDS = ('train', 'test', 'unseen')
#: Files of an LMDB folder the build writes (used to infer the files of a manifest that predates its file list).
LMDB_FILES = ('data.mdb', 'lock.mdb', META_FILE, BUILD_FILE)
#: Paths a refusal names before it only counts the rest.
LISTED_EXTRAS = 10


class MiniBuildError(ValueError):
    """MD-Mini cannot be built into the requested folder (the message says why and what to do)."""


def seeded(seed: int, *names: str) -> np.random.Generator:
    digest = hashlib.sha256('/'.join(names).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], 'little')])


def _bit_depth(pool: str) -> int:
    return 16 if POOL_DOMAIN.get(pool, pool) == 'medical' else 8


def _normalised(block: Block, pool: str) -> np.ndarray:
    """Block pixels in ``[0, 1]`` (nuclear-medicine counts divided by the block's peak)."""
    img = block.pixels()
    return np.clip(img / max(float(img.max()), 1.0), 0, 1).astype(np.float32) if pool == 'nm' else img


def make_pair(task: Task, block: Block, rng: np.random.Generator, params: Optional[dict] = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """GT and LQ, float ``(H, W, C)`` in ``[0, 1]``, of one held-out block (nuclear medicine thins real counts)."""
    if task.pool == 'nm' and task.degradation == 'low_count' and params is None:
        img = block.pixels()
        peak = max(float(img.max()), 1.0)
        return np.clip(img / peak, 0, 1), np.clip(deg.poisson_thinning(img, rng) / peak, 0, 1).astype(np.float32)
    return deg.degrade(task.degradation, _normalised(block, task.pool), rng, params)


def _write_png(path: str, img: np.ndarray, bit_depth: int) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, to_stored(img, ImageFormat(bit_depth, img.shape[2]))):
        raise OSError(f'cannot write {path}')


def _description(task: Task, block: Block) -> str:
    return f'[template] {DOMAIN_WORDS[task.domain]} ({block.parent.original}), {task.what}.'


def _record(chosen: list[Block]) -> list[dict]:
    return [{'name': b.name, 'parent': b.parent.name, 'original': b.parent.original, 'box': b.global_box()}
            for b in chosen]


def _write_pairs(folder: str, task: Task, chosen: list[Block], seed: int, params: Optional[dict] = None) -> None:
    for block in chosen:
        gt, lq = make_pair(task, block, seeded(seed, task.name, block.name), params)
        _write_png(osp.join(folder, 'gt', block.name + '.png'), gt, task.bit_depth)
        _write_png(osp.join(folder, 'lq', block.name + '.png'), lq, task.bit_depth)
    make_paired_lmdb(osp.join(folder, 'gt'), osp.join(folder, 'lq'), osp.join(folder, 'gt.lmdb'),
                     osp.join(folder, 'lq.lmdb'), compress_level=LMDB_COMPRESS_LEVEL)


def _write_pool(root: str, pool: str, chosen: list[Block]) -> None:
    folder = osp.join(root, TRAIN_DIR, pool)
    for block in chosen:
        _write_png(osp.join(folder, 'gt', block.name + '.png'), _normalised(block, pool), _bit_depth(pool))
    write_lmdb(folder_items(osp.join(folder, 'gt')), osp.join(folder, 'gt.lmdb'), compress_level=LMDB_COMPRESS_LEVEL)


def _write_descriptions(root: str, task: Task, splits: dict[str, list[Block]]) -> None:
    texts = {'__generator__': 'template (datprl_arch.mdmini); replace the texts with MLLM descriptions of the GT '
                              'images, keeping the image names'}
    texts.update({b.name + '.png': _description(task, b) for chosen in splits.values() for b in chosen})
    os.makedirs(osp.join(root, task.name), exist_ok=True)
    with open(osp.join(root, task.name, 'descriptions.json'), 'w') as f:
        json.dump(texts, f, indent=1)


# ----------------------------------------------------------------------------------------------------------- options
def _source(out: str, task: Task, folder: str, backend: str, synth: bool) -> dict:
    suffix = '.lmdb' if backend == 'lmdb' else ''
    entry = {'name': task.name, 'domain': task.domain, 'task': task.task}
    if synth:
        entry.update(dataroot_gt=osp.join(out, TRAIN_DIR, task.pool, 'gt' + suffix), mode='synth',
                     degradation={'type': task.degradation, **(task.train or {})})
        if task.degradation == 'identity':
            entry['weight'] = CLEAN_WEIGHT
    else:
        entry.update(dataroot_gt=osp.join(folder, 'gt' + suffix), dataroot_lq=osp.join(folder, 'lq' + suffix))
    entry.update(io_backend={'type': backend}, descriptions=osp.join(out, task.name, 'descriptions.json'))
    return entry


def dataset_options(out: str, tasks: Sequence[Task], unseen: Sequence[Task]) -> dict:
    """``datasets:`` sections: training (synthesised from the LMDB pools, balanced), validation / test (LMDB pairs,
    one set per source) and the unseen check."""
    everything = list(tasks) + [t for t in unseen if t not in tasks]
    vocab = {'domains': [d for d in DOMAINS if any(t.domain == d for t in everything)],
             'tasks': list(dict.fromkeys(t.task for t in everything))}
    train = {'name': 'md_mini_train', 'type': 'DATPRLMultiDomainDataset',
             'datasets': [_source(out, t, '', 'lmdb', True) for t in tasks], **vocab, 'channels': 3, 'gt_size': 48,
             'photometric': {'brightness': 0.1, 'contrast': 0.15, 'gamma': 0.2, 'saturation': 0.2},
             'use_hflip': True, 'use_rot': True, 'sampling': 'balanced', 'num_worker_per_gpu': 2,
             'batch_size_per_gpu': len(tasks), 'dataset_enlarge_ratio': 100, 'prefetch_mode': None}

    def held_out(split, chosen, root):
        phase = 'val' if split == 'val' else 'test'  # BasicSR reads the phase from the key's prefix
        key = split if split == phase else f'{phase}_{split}'
        folder = {t.name: osp.join(root, t.name, split) if root == out else osp.join(root, t.name) for t in chosen}
        return {f'{key}_{t.name}': {'name': f'md_mini_{split}_{t.name}', 'type': 'DATPRLMultiDomainDataset',
                                    'datasets': [_source(out, t, folder[t.name], 'lmdb', False)], **vocab,
                                    'channels': 3}
                for t in chosen}

    degraded = [t for t in tasks if t.degradation != 'identity']
    return {'train': {'train': train, **held_out('val', tasks, out)}, 'test': held_out('test', degraded, out),
            'unseen': held_out('unseen', unseen, osp.join(out, UNSEEN_DIR))}


def _write_fragments(tmp: str, out: str, tasks, unseen, seed: int) -> None:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # write shared lists out in full, never as &anchors
            return True

    for kind, body in dataset_options(out, tasks, unseen).items():
        header = (f'# MD-Mini {kind} datasets (python -m datprl_arch.mdmini --out {out} --seed {seed}).\n'
                  f'# Paste this `datasets:` block into a BasicSR option file; paths are relative to the directory\n'
                  f'# the runner is started from.\n')
        with open(osp.join(tmp, f'options_{kind}.yml'), 'w') as f:
            f.write(header + yaml.dump({'datasets': body}, Dumper=Dumper, sort_keys=False, default_flow_style=None,
                                       width=110))


# ----------------------------------------------------------------------------------------------------------- build
def remove_stale_builds(out: str) -> list[str]:
    """Delete ``<out>.partial-<pid>`` / ``<out>.old-<pid>`` folders left by builds whose process is gone."""
    stale = stale_debris(osp.dirname(osp.abspath(out)), ('partial', 'old'), target=osp.abspath(out))
    for debris in stale:
        remove(debris.path)
    return [debris.path for debris in stale]


def _tree_files(root: str) -> list[str]:
    """Every file under ``root`` as a sorted ``/``-separated path relative to it (what a manifest lists)."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        rel = osp.relpath(dirpath, root).replace(os.sep, '/')
        found += [name if rel == '.' else f'{rel}/{name}' for name in filenames]
    return sorted(found)


def _implied_files(manifest: dict) -> set[str]:
    """The files an earlier build wrote, inferred from its records in today's layout: manifests written before
    builds listed their files (``files``) record only the top-level entries, the blocks and the sources."""
    def pngs(folder, records):
        return {f'{folder}/{record["name"]}.png' for record in records}

    def lmdb(folder):
        return {f'{folder}/{name}' for name in LMDB_FILES}

    files = {MANIFEST} | {f'options_{kind}.yml' for kind in FRAGMENT_KINDS}
    pools = manifest.get('pools', {})
    for pool, splits in pools.items():
        files |= pngs(f'{TRAIN_DIR}/{pool}/gt', splits.get('train', ())) | lmdb(f'{TRAIN_DIR}/{pool}/gt.lmdb')
    pool_of = {t.name: t.pool for t in TASKS + CLEAN_TASKS}
    for source in manifest.get('sources', {}):
        files.add(f'{source}/descriptions.json')
        for split in ('val', 'test'):
            records = pools.get(pool_of.get(source), {}).get(split, ())
            for side in ('gt', 'lq'):
                files |= pngs(f'{source}/{split}/{side}', records) | lmdb(f'{source}/{split}/{side}.lmdb')
    for source, record in manifest.get('unseen', {}).items():
        for side in ('gt', 'lq'):
            folder = f'{UNSEEN_DIR}/{source}/{side}'
            files |= pngs(folder, record.get('blocks', ())) | lmdb(folder + '.lmdb')
    return files


def _foreign_entries(out: str, files: set[str]) -> list[str]:
    """Paths under ``out`` the build did not write, at any depth: files it does not list and folders that hold none
    of its files (named once, with a trailing ``/``, not file by file); links are never the build's."""
    folders = {posixpath.dirname(path) for path in files}
    for folder in list(folders):
        while folder:
            folder = posixpath.dirname(folder)
            folders.add(folder)
    allowed = files | set(DERIVED_FILES)
    foreign = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = osp.relpath(dirpath, out).replace(os.sep, '/')
        prefix = '' if rel == '.' else rel + '/'
        for name in sorted(dirnames):
            if prefix + name not in folders or osp.islink(osp.join(dirpath, name)):
                foreign.append(prefix + name + '/')
                dirnames.remove(name)  # named as a whole, not walked
        foreign += [prefix + name for name in filenames
                    if prefix + name not in allowed or osp.islink(osp.join(dirpath, name))]
    return sorted(foreign)


def _check_target(out: str, wanted: dict, overwrite: bool) -> Optional[dict]:
    """The reusable manifest at ``out``, None when a build may go there; raises when ``out`` must not be touched.

    A build is replaced only when every file and folder under ``out`` is one its manifest lists (or, for a manifest
    that lists no files, one its records imply): user files nested anywhere in it stop the overwrite.
    """
    manifest_path = osp.join(out, MANIFEST)
    if not osp.exists(out) or (osp.isdir(out) and not os.listdir(out)):
        return None
    if not osp.isfile(manifest_path):
        raise MiniBuildError(f'{out} exists and is not an MD-Mini build (no {MANIFEST}); MD-Mini writes only into '
                             'an empty or new folder or over its own earlier build: choose another --out.')
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise MiniBuildError(f'cannot read {manifest_path} ({err}); MD-Mini replaces only a build whose manifest '
                             'lists what it wrote: move your files out or choose another --out.') from None
    if not isinstance(manifest, dict):
        raise MiniBuildError(f'{manifest_path} is not an MD-Mini manifest (expected a JSON object); MD-Mini '
                             'replaces only its own builds: choose another --out.')
    if manifest.get('settings') == wanted:
        return manifest
    listed = 'files' in manifest
    foreign = _foreign_entries(out, set(manifest['files']) if listed else _implied_files(manifest))
    if foreign:
        more = f' and {len(foreign) - LISTED_EXTRAS} more' if len(foreign) > LISTED_EXTRAS else ''
        origin = '' if listed else (' (its manifest, from an older MD-Mini, lists no files: they were inferred from '
                                    'its blocks and sources)')
        raise MiniBuildError(f'{out} holds an MD-Mini build and also {len(foreign)} entries it did not write '
                             f'({", ".join(foreign[:LISTED_EXTRAS])}{more}){origin}; MD-Mini never replaces files '
                             'it did not write: move them out or choose another --out.')
    if not overwrite:
        raise MiniBuildError(f'{out} holds an MD-Mini build with settings {manifest.get("settings")}; pass '
                             f'--overwrite to replace that build with {wanted}, or choose another --out.')
    return None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_limit(limit) -> None:
    """Raise unless ``limit`` is a usable number of training blocks per pool (a slice bound would build silently
    with every block but the last ones for a negative value, and nothing for zero)."""
    if not _is_int(limit) or limit < MIN_LIMIT:
        raise MiniBuildError(f'limit {limit!r} is not a number of training blocks per pool: expected an integer '
                             f'>= {MIN_LIMIT} (default {DEFAULT_LIMIT}).')


def check_seed(seed) -> None:
    """Raise unless ``seed`` is an integer numpy's generators accept (>= 0)."""
    if not _is_int(seed) or seed < 0:
        raise MiniBuildError(f'seed {seed!r} is not usable: expected an integer >= 0.')


def build(out: str = DEFAULT_OUT, seed: int = 0, limit: int = DEFAULT_LIMIT, overwrite: bool = False,
          sources: Optional[Sequence[str]] = None, unseen: bool = True) -> dict:
    """Build MD-Mini into ``out`` and return its manifest (see the module docstring).

    ``sources`` restricts the build to some source names (tests); ``unseen=False`` skips the out-of-sample check.
    """
    from basicsr.utils import get_root_logger

    logger = get_root_logger()
    check_limit(limit)
    check_seed(seed)
    every = TASKS + CLEAN_TASKS
    unknown = set(sources or ()) - {t.name for t in every}
    if unknown:
        raise MiniBuildError(f'unknown MD-Mini sources {sorted(unknown)}; choose from {[t.name for t in every]}.')
    tasks = [t for t in every if sources is None or t.name in sources]
    checks = [t for t in tasks if t.unseen is not None] if unseen else []
    wanted = {'format': FORMAT_VERSION, 'seed': seed, 'limit': limit, 'sources': [t.name for t in tasks],
              'unseen': [t.name for t in checks]}
    for path in remove_stale_builds(out):
        logger.info(f'Removed {path}, left by an interrupted MD-Mini build.')
    reused = _check_target(out, wanted, overwrite)
    if reused is not None:
        logger.info(f'MD-Mini in {out} is up to date (seed {seed}); reusing it.')
        return reused

    tmp = f'{osp.abspath(out)}.partial-{os.getpid()}'
    manifest = {'settings': wanted, 'pools': {}, 'sources': {}, 'unseen': {}}
    try:
        splits = {}
        for pool in dict.fromkeys(t.pool for t in tasks):
            parents = POOLS[pool]()
            chosen = split_pool(parents, POOL_DOMAIN[pool], seeded(seed, 'split', pool))
            chosen['train'] = limit_blocks(chosen['train'], limit, seeded(seed, 'train', pool))
            splits[pool] = chosen
            _write_pool(tmp, pool, chosen['train'])
            manifest['pools'][pool] = {s: _record(b) for s, b in chosen.items()}
            logger.info(f'MD-Mini pool {pool}: ' + ', '.join(f'{s} {len(b)}' for s, b in chosen.items()))
        for task in tasks:
            for split in ('val', 'test'):
                _write_pairs(osp.join(tmp, task.name, split), task, splits[task.pool][split], seed)
            manifest['sources'][task.name] = {s: len(splits[task.pool][s]) for s in SPLITS}
        for task in checks:
            manifest['unseen'][task.name] = _write_unseen(tmp, task, seed)
        for task in tasks:
            unseen_blocks = {'unseen': _unseen_blocks(task, seed)} if task in checks else {}
            _write_descriptions(tmp, task, {**splits[task.pool], **unseen_blocks})
        _write_fragments(tmp, out, tasks, checks, seed)
        manifest['entries'] = sorted(os.listdir(tmp)) + [MANIFEST]
        manifest['files'] = sorted(_tree_files(tmp) + [MANIFEST])
        with open(osp.join(tmp, MANIFEST), 'w') as f:
            json.dump(manifest, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, out)
    return manifest


def _install(tmp: str, out: str) -> None:
    """Swap the finished build in; an earlier build is moved aside first and deleted only after the swap."""
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    old = f'{osp.abspath(out)}.old-{os.getpid()}'
    if osp.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------- unseen
def _unseen_blocks(task: Task, seed: int) -> list[Block]:
    """The held-out-size textured blocks of the images reserved for the unseen check of ``task``'s domain."""
    from .split import texture_threshold, textured
    parents = UNSEEN_POOLS[task.domain]()
    side = held_out_side(task.domain)
    threshold = texture_threshold(parents, side)
    usable = [b for p in parents for b in textured(p, side, threshold)]
    return limit_blocks(usable, HELD_OUT_IMAGES['test'], seeded(seed, 'unseen', task.domain)) or [
        b for p in parents for b in blocks(p, side)][:HELD_OUT_IMAGES['test']]


def _write_unseen(root: str, task: Task, seed: int) -> dict:
    chosen = _unseen_blocks(task, seed)
    _write_pairs(osp.join(root, UNSEEN_DIR, task.name), task, chosen, seed + 1, dict(task.unseen))
    return {'images': len(chosen), 'parameters': task.unseen, 'blocks': _record(chosen)}
