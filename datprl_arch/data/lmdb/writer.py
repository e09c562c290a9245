"""Write image folders into BasicSR-format LMDBs, safely (the library of ``python -m datprl_arch.tools.make_lmdb``).

The result is what BasicSR's own ``PairedImageDataset`` and our multi-domain dataset read: one PNG-encoded value per
image under the key ``<stem>`` and a ``meta_info.txt`` with ``<stem>.png (h,w,c) <compress level>`` lines. Compared
with BasicSR's ``make_lmdb_from_imgs`` the writer

* checks everything before writing: LQ/GT partners (LQ values are stored under their GT's key, as BasicSR requires),
  readable images, and keys (ASCII, no dots or whitespace: BasicSR cuts ``meta_info.txt`` names at the first dot);
* keeps 16-bit and single-channel images as they are;
* sizes the map explicitly from the images' pixel counts instead of extrapolating from the first image;
* writes to ``<name>.lmdb.partial-<pid>``, reads every value back, and only then renames to ``<name>.lmdb``, so an
  interrupted run never leaves a database that looks complete;
* writes a build record (``datprl_build.json``, see :mod:`.meta`: build id, content digest, and for a GT/LQ pair the
  partner's digest) into each database, so a dataset refuses a GT and an LQ of different builds;
* installs a pair only when both are complete, and the next run (of any writer on these paths) finishes an install
  that a killed run left half done (the new GT beside the old LQ), or undoes an incomplete one (:mod:`.install`).
"""
from __future__ import annotations

import hashlib
import os
import os.path as osp
import re
import shutil
import uuid
from typing import Optional, Sequence

import cv2
import lmdb
import numpy as np

from ...errors import DatprlError
from ...utils.atomic import atomic_write_json
from ...utils.debris import remove
from ...utils.problems import Problems
from ..image_io import check_file
from ..sources import pairs_from_folders, scan_images, stem
from .install import install, recover_interrupted_installs
from .meta import BUILD_FILE, META_FILE, build_record, meta_line, read_lmdb_meta

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


def _problems(target: str) -> Problems:
    """The problem collector of one write: it raises one :class:`LmdbWriteError`, before anything is written."""
    return Problems(f'LMDB {target}', LmdbWriteError, ' (nothing was written)')


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


def read_image(path: str) -> np.ndarray:
    """The stored pixels of the image file at ``path`` (8- or 16-bit, as many channels as it has)."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise LmdbWriteError(f'{path}: not a readable image.')
    if img.dtype not in (np.uint8, np.uint16):
        raise LmdbWriteError(f'{path}: {img.dtype} pixels cannot be stored as PNG (expected 8- or 16-bit).')
    return img


def _shape(img: np.ndarray) -> tuple[int, int, int]:
    """``(h, w, c)`` of an OpenCV image (``c`` = 1 for a 2-D array)."""
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
        record = build_record(build, role, contents[role], len(digests))
        if partner:
            record.update(partner=osp.relpath(osp.abspath(builds[partner][0]), osp.dirname(osp.abspath(path))),
                          partner_content=contents[partner])
        atomic_write_json(record, osp.join(tmp, BUILD_FILE))


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
    problems = _problems(lmdb_path)
    _check_items(items, lmdb_path, overwrite, problems)
    problems.raise_if_any()
    tmp, digests = _build(items, lmdb_path, compress_level, map_size)
    try:
        _write_records({'single': (lmdb_path, tmp, digests)}, uuid.uuid4().hex)
    except BaseException:
        remove(tmp)
        raise
    install([(tmp, lmdb_path)])
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
        with open(osp.join(tmp, META_FILE), 'w', encoding='ascii') as f:
            f.writelines(meta)
    except lmdb.MapFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmdbWriteError(f'{lmdb_path}: map size {map_size} bytes is too small; pass a larger '
                             '--map-size.') from None
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
                img = read_image(path)
                ok, buf = cv2.imencode('.png', img, png_params(compress_level))
                if not ok:
                    raise LmdbWriteError(f'{path}: PNG encoding failed.')
                value = buf.tobytes()
                txn.put(key.encode('ascii'), value)
                digests[key] = hashlib.blake2b(value, digest_size=16).digest()
                meta.append(meta_line(key, _shape(img), compress_level))
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
    problems = _problems(f'{gt_lmdb} + {lq_lmdb}')
    pairs = pairs_from_folders('pairing', gt_dir, lq_dir, filename_tmpl, problems)
    gt_items, lq_items = [(p.name, p.gt) for p in pairs], [(p.name, p.lq) for p in pairs]
    overwrite = kwargs.get('overwrite', False)
    _check_items(gt_items, gt_lmdb, overwrite, problems)
    _check_items(lq_items, lq_lmdb, overwrite, problems)
    problems.raise_if_any()
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
    install([(gt_tmp, gt_lmdb), (lq_tmp, lq_lmdb)])  # both are complete and verified: install them together
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
