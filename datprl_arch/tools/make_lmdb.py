"""Write image folders into BasicSR-format LMDBs, safely.

    python -m datprl_arch.tools.make_lmdb --gt data/gt --gt-lmdb data/gt.lmdb [--lq data/lq --lq-lmdb data/lq.lmdb]

The result is what BasicSR's own ``PairedImageDataset`` and our multi-domain dataset read: one PNG-encoded value per
image under the key ``<stem>`` and a ``meta_info.txt`` with ``<stem>.png (h,w,c) <compress level>`` lines. Compared with BasicSR's ``make_lmdb_from_imgs`` this tool

* checks everything before writing: LQ/GT partners (LQ values are stored under their GT's key, as BasicSR requires),
  readable images, and keys (ASCII, no dots or whitespace: BasicSR cuts ``meta_info.txt`` names at the first dot);
* keeps 16-bit and single-channel images as they are;
* sizes the map explicitly from the images' pixel counts instead of extrapolating from the first image;
* writes to ``<name>.lmdb.partial-<pid>``, reads every value back, and only then renames to ``<name>.lmdb``, so an
  interrupted run never leaves a database that looks complete;
* writes a build record (``datprl_build.json``: build id, content digest, and for a GT/LQ pair the partner's
  digest) into each database, so a dataset refuses a GT and an LQ of different builds;
* installs a pair only when both are complete, and the next run (of any make_lmdb on these paths) finishes an
  install that a killed run left half done (the new GT beside the old LQ), or undoes an incomplete one.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import os.path as osp
import re
import shutil
import sys
import uuid
from typing import Optional, Sequence

import cv2
import lmdb
import numpy as np

from datprl_arch.data.image_io import check_file
from datprl_arch.data.lmdb_env import BUILD_FILE, BUILD_FORMAT, read_build_record
from datprl_arch.data.sources import Problems, pairs_from_folders, read_lmdb_meta, scan_images, stem
from datprl_arch.errors import DatprlError
from datprl_arch.utils.atomic import atomic_write_json
from datprl_arch.utils.debris import remove, stale_debris

#: PNG compression level of stored values (BasicSR's default: fast to decode).
DEFAULT_COMPRESS_LEVEL = 1
#: Map size per pixel: 4 channels x 16 bit, an upper bound of any PNG value (PNG grows raw data by < 1 %; the map
#: is a sparse file, so the slack costs no disk).
MAP_BYTES_PER_PIXEL = 8
#: Fixed map allowance for LMDB's own pages.
MAP_SIZE_ALLOWANCE = 64 << 20
#: LMDB's default maximum key length in bytes.
MAX_KEY_BYTES = 511
#: A valid key: printable ASCII without whitespace and without dots.
_KEY = re.compile(r'^[!-~]+$')


class LmdbWriteError(DatprlError, ValueError):
    """The inputs cannot be written as a valid BasicSR LMDB; the message lists the problems."""


def key_problem(key: str) -> Optional[str]:
    """Why ``key`` cannot be a BasicSR LMDB key, or None when it can."""
    if not key.isascii() or not _KEY.match(key):
        return f'key {key!r} must be printable ASCII without whitespace (keys are stored with .encode("ascii")).'
    if '.' in key:
        return (f"key {key!r} contains '.', which BasicSR's meta_info.txt parser cuts off (split('.')[0]); "
                f"rename the file, e.g. {key.replace('.', '_')!r}.")
    if len(key.encode('ascii')) > MAX_KEY_BYTES:
        return f'key {key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes.'
    return None


def png_params(compress_level: int) -> list[int]:
    """PNG encoder flags; level 0 also turns off row filters, which only help compression: the value then decodes
    several times faster (a plain copy), at the price of raw-size storage."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, compress_level]
    if compress_level == 0:
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    return params


def _read(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise LmdbWriteError(f'{path}: not a readable image.')
    if img.dtype not in (np.uint8, np.uint16):
        raise LmdbWriteError(f'{path}: {img.dtype} pixels cannot be stored as PNG (expected 8- or 16-bit).')
    return img


def _shape(img: np.ndarray) -> tuple[int, int, int]:
    return (img.shape[0], img.shape[1], 1 if img.ndim == 2 else img.shape[2])


def estimate_map_size(paths: Sequence[str]) -> int:
    """Map size in bytes that holds PNG values of the given images (pixel counts read from their headers)."""
    pixels = 0
    for path in paths:
        h, w = check_file(path, verify=False)
        pixels += h * w
    return pixels * MAP_BYTES_PER_PIXEL + MAP_SIZE_ALLOWANCE


def _content_digest(digests: dict) -> str:
    """Digest of a database's content: its keys and the digests of their values."""
    total = hashlib.blake2b(digest_size=16)
    for key in sorted(digests):
        total.update(key.encode('ascii') + b'\0' + digests[key])
    return total.hexdigest()


def _write_records(builds: dict, build: str) -> None:
    """Write the build record into each built (not yet installed) database; ``builds`` maps a role (``single``,
    ``gt``, ``lq``) to ``(target path, temporary path, value digests)``. The record is written last: a temporary
    database with a record is complete."""
    contents = {role: _content_digest(digests) for role, (_, _, digests) in builds.items()}
    for role, (path, tmp, digests) in builds.items():
        partner = {'gt': 'lq', 'lq': 'gt'}.get(role)
        record = {'format': BUILD_FORMAT, 'version': 1, 'build': build, 'role': role, 'content': contents[role],
                  'entries': len(digests), 'partner': None, 'partner_content': None}
        if partner:
            record.update(partner=osp.relpath(osp.abspath(builds[partner][0]), osp.dirname(osp.abspath(path))),
                          partner_content=contents[partner])
        atomic_write_json(record, osp.join(tmp, BUILD_FILE))


def _partners(path: str, pid: int) -> list[str]:
    """``path`` and the databases its build records (current, new, old) name as its partner."""
    group = [osp.abspath(path)]
    for candidate in (f'{path}.partial-{pid}', path, f'{path}.old-{pid}'):
        record = read_build_record(candidate) if osp.isdir(candidate) else None
        if record and record.get('partner'):
            partner = osp.normpath(osp.join(osp.dirname(osp.abspath(path)), record['partner']))
            if partner not in group:
                group.append(partner)
    return group


def _recover(group: list[str], pid: int) -> str:
    """Finish (every database of process ``pid``'s build is complete) or undo (it is not) its install."""
    partial, old = {p: f'{p}.partial-{pid}' for p in group}, {p: f'{p}.old-{pid}' for p in group}

    def build_of(path):
        record = read_build_record(path) if osp.isdir(path) else None
        return record.get('build') if record else None

    builds = {build_of(partial[p]) for p in group} - {None}
    build = builds.pop() if len(builds) == 1 else None
    if build is not None and all(build in (build_of(partial[p]), build_of(p)) for p in group):
        for p in group:  # GT first, as the interrupted run did
            if osp.isdir(partial[p]):
                if osp.lexists(p):
                    remove(old[p])
                    os.replace(p, old[p])
                os.replace(partial[p], p)
        action = 'finished'
    elif not any(osp.lexists(partial[p]) for p in group) and all(osp.lexists(p) for p in group):
        action = 'already complete (the new databases were in place; the old copies are removed)'
    else:
        for p in group:
            remove(partial[p])
            if not osp.lexists(p) and osp.lexists(old[p]):
                os.replace(old[p], p)
        action = 'undone (the previous databases are kept)'
    for p in group:
        remove(old[p])
    return f'An install of {" + ".join(group)} interrupted in process {pid} was {action}.'


def recover_interrupted_installs(lmdb_paths: Sequence[str]) -> list[str]:
    """Finish or undo the installs that dead processes left half done at ``lmdb_paths`` (and their partners):
    ``<db>.partial-<pid>`` / ``<db>.old-<pid>`` of a process no longer running. Returns what was done (logged)."""
    from basicsr.utils import get_root_logger

    done = []
    for path in lmdb_paths:
        parent = osp.dirname(osp.abspath(path))
        for pid in sorted({d.pid for d in stale_debris(parent, ('partial', 'old'), target=path)}):
            done.append(_recover(_partners(path, pid), pid))
            get_root_logger().warning(done[-1])
    return done


def _install(built: Sequence[tuple[str, str]]) -> None:
    """Rename the checked temporary databases ``(tmp, target)`` into place, in order; old ones are renamed aside
    first and removed only after every new one is in place (an interruption is recovered by the next run)."""
    pid = os.getpid()
    for tmp, path in built:
        if osp.lexists(path):
            remove(f'{path}.old-{pid}')
            os.replace(path, f'{path}.old-{pid}')
        os.replace(tmp, path)
    for _, path in built:
        remove(f'{path}.old-{pid}')


def write_lmdb(items: Sequence[tuple[str, str]], lmdb_path: str, compress_level: int = DEFAULT_COMPRESS_LEVEL,
               map_size: Optional[int] = None, overwrite: bool = False) -> int:
    """Write ``(key, image path)`` items to ``lmdb_path`` (must end in ``.lmdb``); returns the number written.

    Raises :class:`LmdbWriteError` before writing anything when keys or images are bad or the target exists
    (unless ``overwrite``). Values go to ``<lmdb_path>.partial-<pid>`` (a name no BasicSR dataset accepts);
    ``meta_info.txt`` is written only after every value was read back and matched, then the folder is renamed.
    BasicSR's ``LmdbMaker`` is not used because it exits the process on an existing path and writes
    ``meta_info.txt`` while values are still being added.
    """
    recover_interrupted_installs([lmdb_path])
    problems = Problems(lmdb_path)
    _check_items(items, lmdb_path, overwrite, problems)
    _raise(problems)
    tmp, digests = _build(items, lmdb_path, compress_level, map_size)
    try:
        _write_records({'single': (lmdb_path, tmp, digests)}, uuid.uuid4().hex)
    except BaseException:
        remove(tmp)
        raise
    _install([(tmp, lmdb_path)])
    return len(digests)


def _check_items(items: Sequence[tuple[str, str]], lmdb_path: str, overwrite: bool, problems: Problems) -> None:
    """Record every problem of the target path and the keys before anything is written."""
    if not lmdb_path.endswith('.lmdb'):
        problems.add('output', f'{lmdb_path} must end with .lmdb (BasicSR checks the suffix).')
    if osp.exists(lmdb_path) and not overwrite:
        problems.add('output', f'{lmdb_path} already exists; pass --overwrite to replace it.')
    if not items:
        problems.add('input', f'no images to write to {lmdb_path}.')
    seen = {}
    for key, path in items:
        why = key_problem(key)
        if why:
            problems.add(path, why)
        if key in seen:
            problems.add(path, f'key {key!r} is also used by {seen[key]} (image names must be unique).')
        seen[key] = path


def _build(items, lmdb_path: str, compress_level: int = DEFAULT_COMPRESS_LEVEL,
           map_size: Optional[int] = None) -> tuple[str, dict]:
    """Write and verify ``<lmdb_path>.partial-<pid>``; returns it (not yet installed, no build record yet) and the
    value digests. Nothing is left behind on failure."""
    map_size = int(map_size or estimate_map_size([p for _, p in items]))
    os.makedirs(osp.dirname(osp.abspath(lmdb_path)), exist_ok=True)
    tmp = f'{lmdb_path}.partial-{os.getpid()}'
    try:
        digests, meta = _write_values(items, tmp, map_size, compress_level)
        _read_back(tmp, digests)
        with open(osp.join(tmp, 'meta_info.txt'), 'w', encoding='ascii') as f:
            f.writelines(meta)
    except lmdb.MapFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmdbWriteError(f'{lmdb_path}: map size {map_size} bytes is too small; pass a larger --map-size.') from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, digests


def _write_values(items, tmp, map_size, compress_level) -> tuple[dict, list[str]]:
    """PNG-encode and store every image; returns value digests and the meta_info.txt lines."""
    digests, meta = {}, []
    env = lmdb.open(tmp, map_size=map_size)
    try:
        with env.begin(write=True) as txn:
            for key, path in items:
                img = _read(path)
                ok, buf = cv2.imencode('.png', img, png_params(compress_level))
                if not ok:
                    raise LmdbWriteError(f'{path}: PNG encoding failed.')
                value = buf.tobytes()
                txn.put(key.encode('ascii'), value)
                digests[key] = hashlib.blake2b(value, digest_size=16).digest()
                h, w, c = _shape(img)
                meta.append(f'{key}.png ({h},{w},{c}) {compress_level}\n')
    finally:
        env.close()
    return digests, meta


def _read_back(tmp: str, digests: dict) -> None:
    env = lmdb.open(tmp, readonly=True, lock=False)
    try:
        with env.begin(write=False) as txn:
            stored = txn.stat()['entries']
            for key, digest in digests.items():
                value = txn.get(key.encode('ascii'))
                if value is None or hashlib.blake2b(value, digest_size=16).digest() != digest:
                    raise LmdbWriteError(f'{tmp}: read-back check failed for key {key!r}; nothing was installed.')
    finally:
        env.close()
    if stored != len(digests):
        raise LmdbWriteError(f'{tmp}: {stored} entries stored, {len(digests)} expected; nothing was installed.')


def _raise(problems: Problems) -> None:
    try:
        problems.raise_if_any()
    except ValueError as err:
        raise LmdbWriteError(str(err)) from None


def folder_items(folder: str) -> list[tuple[str, str]]:
    """``(key, path)`` for every image of ``folder`` (key = file stem)."""
    return [(stem(f), osp.join(folder, f)) for f in scan_images(folder)]


def make_paired_lmdb(gt_dir: str, lq_dir: str, gt_lmdb: str, lq_lmdb: str, filename_tmpl: str = '{}',
                     **kwargs) -> int:
    """Write matching GT and LQ LMDBs; LQ values are stored under their GT's key. Returns the number of pairs.

    Pairing problems (a partner missing on either side, empty folders) and problems of either target are reported
    before anything is written; both databases are built and verified before either is installed.
    ``kwargs`` (``compress_level``, ``map_size``, ``overwrite``) are those of :func:`write_lmdb`.
    """
    recover_interrupted_installs([gt_lmdb, lq_lmdb])
    problems = Problems(f'{gt_dir} + {lq_dir}')
    pairs = pairs_from_folders('pairing', gt_dir, lq_dir, filename_tmpl, problems)
    gt_items, lq_items = [(p.name, p.gt) for p in pairs], [(p.name, p.lq) for p in pairs]
    overwrite = kwargs.get('overwrite', False)
    _check_items(gt_items, gt_lmdb, overwrite, problems)
    _check_items(lq_items, lq_lmdb, overwrite, problems)
    _raise(problems)
    build = {k: v for k, v in kwargs.items() if k != 'overwrite'}
    gt_tmp, gt_digests = _build(gt_items, gt_lmdb, **build)
    lq_tmp = None
    try:
        lq_tmp, lq_digests = _build(lq_items, lq_lmdb, **build)
        _write_records({'gt': (gt_lmdb, gt_tmp, gt_digests), 'lq': (lq_lmdb, lq_tmp, lq_digests)}, uuid.uuid4().hex)
    except BaseException:
        for tmp in (gt_tmp, lq_tmp):
            if tmp:
                remove(tmp)
        raise
    _install([(gt_tmp, gt_lmdb), (lq_tmp, lq_lmdb)])  # both are complete and verified: install them together
    return len(gt_digests)


def verify_lmdb(lmdb_path: str) -> int:
    """Check that every key of ``meta_info.txt`` is stored and decodes to the listed shape; returns the count."""
    meta = read_lmdb_meta(lmdb_path)
    env = lmdb.open(lmdb_path, readonly=True, lock=False)
    try:
        with env.begin(write=False) as txn:
            for key, shape in meta.items():
                value = txn.get(key.encode('ascii'))
                img = None if value is None else cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
                if img is None or _shape(img) != shape:
                    raise LmdbWriteError(f'{lmdb_path}: key {key!r} is missing or does not decode to {shape}.')
    finally:
        env.close()
    return len(meta)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basicsr.utils import get_root_logger

    parser = argparse.ArgumentParser(prog='python -m datprl_arch.tools.make_lmdb', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gt', required=True, help='folder of GT images (or of any images, without --lq)')
    parser.add_argument('--gt-lmdb', required=True, help='output path for the GT database, ending in .lmdb')
    parser.add_argument('--lq', help='folder of LQ images paired with --gt by file stem')
    parser.add_argument('--lq-lmdb', help='output path for the LQ database, ending in .lmdb')
    parser.add_argument('--filename-tmpl', default='{}', help="LQ stem from GT stem, e.g. '{}_x4' (default '{}')")
    parser.add_argument('--compress-level', type=int, default=DEFAULT_COMPRESS_LEVEL,
                        help='PNG level 0-9 (0: raw, fastest to read, largest)')
    parser.add_argument('--map-size', type=int, help='LMDB map size in bytes (default: from the image sizes)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing databases')
    args = parser.parse_args(argv)
    if bool(args.lq) != bool(args.lq_lmdb):
        parser.error('--lq and --lq-lmdb go together.')
    options = dict(compress_level=args.compress_level, map_size=args.map_size, overwrite=args.overwrite)
    try:
        if args.lq:
            count = make_paired_lmdb(args.gt, args.lq, args.gt_lmdb, args.lq_lmdb, args.filename_tmpl, **options)
        else:
            count = write_lmdb(folder_items(args.gt), args.gt_lmdb, **options)
    except LmdbWriteError as err:
        parser.exit(2, f'error: {err}\n')
    targets = ' and '.join(p for p in (args.gt_lmdb, args.lq_lmdb) if p)
    logger = get_root_logger()
    logger.setLevel(logging.INFO)
    logger.info(f'Wrote {count} images to {targets}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
