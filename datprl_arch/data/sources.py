"""One paired source of a multi-domain dataset: option checking, pair discovery and up-front validation.

Every problem that would otherwise surface as a crash inside a DataLoader worker (missing partners, unreadable files,
sizes that contradict the declared scale, crops larger than images, LMDBs without ``meta_info.txt`` or with missing
keys, option typos) is collected while the dataset is constructed and reported in one :class:`DataSourceError` that
names the source and the files.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import os.path as osp
from typing import Optional

from basicsr.utils import scandir

from ..errors import DatprlError
from ..priors.descriptions import DescriptionError, read_descriptions
from ..utils.debris import stale_debris
from ..utils.problems import MAX_LISTED, Problems
from .image_io import IMAGE_SUFFIXES, ImageDecodeError, ImageFormat, check_file, file_format
from .lmdb.checks import LmdbError, inspect_lmdb
from .lmdb.meta import META_FILE, read_build_record, read_lmdb_meta

#: Keys a source entry may carry; anything else is reported as a probable typo.
SOURCE_KEYS = ('name', 'domain', 'task', 'dataroot_gt', 'dataroot_lq', 'io_backend', 'meta_info_file',
               'filename_tmpl', 'augment_factor', 'weight', 'descriptions', 'scale', 'upsample_lq', 'mode', 'sigma',
               'degradation')
#: Keys every source must give.
REQUIRED_KEYS = ('name', 'dataroot_gt', 'dataroot_lq')
#: How a source gets its LQ: from LQ files (``paired``), as GT plus Gaussian noise of std ``sigma``/255 (``noise``),
#: or synthesised from the GT by a registered degradation with random parameters (``synth``, see ``degradations``).
SOURCE_MODES = ('paired', 'noise', 'synth')
#: Modes whose LQ is made from the GT when an item is loaded (no LQ files).
GENERATED_MODES = ('noise', 'synth')
#: Storage backends a source can use.
BACKENDS = ('disk', 'lmdb')


class DataSourceError(DatprlError, ValueError):
    """Bad data or options found while building a dataset; the message lists the first problems."""


def dataset_problems(name: str) -> Problems:
    """The problem collector of the dataset ``name``: it raises one :class:`DataSourceError`."""
    return Problems(f"Dataset '{name}'", DataSourceError, ' in the data or options')


@dataclasses.dataclass
class Pair:
    """One LQ/GT pair: file paths (disk) or keys (LMDB), stored sizes ``(H, W)`` and the image name."""

    lq: str
    gt: str
    name: str
    lq_hw: Optional[tuple[int, int]] = None
    gt_hw: Optional[tuple[int, int]] = None
    lq_fmt: Optional[ImageFormat] = None
    gt_fmt: Optional[ImageFormat] = None


@dataclasses.dataclass
class Source:
    """A validated source: its labels, storage, pairs and sampling parameters."""

    name: str
    domain: str
    task: str
    dataroot_gt: str
    dataroot_lq: str
    backend: str
    io_opt: dict
    pairs: list[Pair]
    augment_factor: int = 1
    weight: float = 1.0
    scale: int = 1
    upsample_lq: bool = False
    descriptions: dict = dataclasses.field(default_factory=dict)
    noise_sigma: Optional[float] = None  # mode 'noise': LQ = GT + N(0, (sigma/255)^2)
    degradation: Optional[dict] = None  # mode 'synth': {'type': name, **parameters} of datprl_arch.data.degradations

    @property
    def generated(self) -> bool:
        """True when the LQ is made from the GT at load time (modes ``noise`` and ``synth``)."""
        return bool(self.noise_sigma) or self.degradation is not None

    @property
    def degradation_params(self) -> dict:
        """Parameters of the ``synth`` degradation (its mapping without ``type``)."""
        return {k: v for k, v in (self.degradation or {}).items() if k != 'type'}

    @property
    def out_scale(self) -> int:
        """Scale between the LQ the network sees and the GT (1 when LQ is upsampled)."""
        return 1 if self.upsample_lq else self.scale

    def file_client_opt(self) -> dict:
        """Keyword arguments for ``basicsr.utils.FileClient`` (without ``type``)."""
        opt = {k: v for k, v in self.io_opt.items() if k != 'type'}
        if self.backend == 'lmdb':
            opt.update(db_paths=[self.dataroot_lq, self.dataroot_gt], client_keys=['lq', 'gt'])
        return opt


def _suggest(key: str, accepted) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ''


def stem(filename: str) -> str:
    """File name without folder and image suffix."""
    return osp.splitext(osp.basename(filename))[0]


def scan_images(folder: str) -> list[str]:
    """Sorted image file names directly inside ``folder`` (hidden files and other suffixes skipped)."""
    return sorted(p for p in scandir(folder) if p.lower().endswith(IMAGE_SUFFIXES) and not p.startswith('.'))


def parse_source(opt: dict, index: int, problems: Problems, official: bool) -> Optional[dict]:
    """Check one source entry's keys and values; returns the normalised entry or None (problems recorded)."""
    label = opt.get('name', f'datasets[{index}]') if isinstance(opt, dict) else f'datasets[{index}]'
    if not isinstance(opt, dict):
        problems.add(label, f'a source must be a mapping with keys {", ".join(REQUIRED_KEYS)}, got {opt!r}.')
        return None
    ok = True
    for key in opt:
        if key not in SOURCE_KEYS:
            problems.add(label, f"unknown key '{key}'{_suggest(key, SOURCE_KEYS)}; accepted keys: "
                         f'{", ".join(SOURCE_KEYS)}.')
            ok = False
    mode = opt.get('mode', 'paired')
    required = REQUIRED_KEYS if official else REQUIRED_KEYS + ('domain', 'task')
    if mode in GENERATED_MODES:
        generator_key = {'noise': 'sigma', 'synth': 'degradation'}[mode]
        required = tuple(k for k in required if k != 'dataroot_lq') + (generator_key,)
    for key in required:
        if key not in opt:
            problems.add(label, f"missing key '{key}' (each source needs {', '.join(required)}).")
            ok = False
    io_opt = dict(opt.get('io_backend') or {'type': 'disk'})
    if io_opt.get('type') not in BACKENDS:
        problems.add(label, f"io_backend.type must be one of {BACKENDS}, got {io_opt.get('type')!r}.")
        ok = False
    numbers = {'augment_factor': (int, 1), 'weight': (float, 1.0), 'scale': (int, 1)}
    parsed = {}
    for key, (kind, default) in numbers.items():
        value = opt.get(key, default)
        try:
            parsed[key] = kind(value)
            valid = 0 < parsed[key] < math.inf and (kind is float or float(value) == parsed[key])
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            infinite = isinstance(parsed.get(key), float) and not math.isfinite(parsed[key])
            problems.add(label, f'{key} must be a positive {kind.__name__}, got {value!r}'
                         f'{" (not a finite number)" if infinite else ""}.')
            ok = False
    if mode not in SOURCE_MODES:
        problems.add(label, f"mode {mode!r} is not supported; use 'paired' (LQ/GT folders), 'noise' (LQ = GT + "
                     "Gaussian noise of std sigma on the 0-255 scale, drawn afresh for every training crop) or 'synth' "
                     '(LQ = a degradation of the GT with random parameters, see datprl_arch/data/degradations.py).')
        ok = False
    elif mode == 'synth' and 'degradation' in opt:
        spec = opt['degradation']
        if not isinstance(spec, dict) or 'type' not in spec:
            problems.add(label, f'degradation must be a mapping with a type (e.g. {{type: rain, length: [8, 40]}}), '
                         f'got {spec!r}.')
            ok = False
        else:
            from .degradations import check_params
            for message in check_params(spec['type'], {k: v for k, v in spec.items() if k != 'type'}):
                problems.add(label, message)
                ok = False
    elif mode == 'noise' and 'sigma' in opt:
        try:
            parsed['sigma'] = float(opt['sigma'])
            valid = parsed['sigma'] > 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            problems.add(label, 'sigma must be a positive number (noise std on the 0-255 scale), got '
                         f"{opt['sigma']!r}.")
            ok = False
    if not ok:
        return None
    return dict(opt, io_backend=io_opt, **parsed)


def pairs_from_folders(name, gt_root, lq_root, tmpl, problems) -> list[Pair]:
    """Pair GT and LQ images by stem (LQ stem = ``tmpl.format(GT stem)``), reporting orphans on both sides."""
    listed = {}
    for root, role in ((gt_root, 'GT'), (lq_root, 'LQ')):
        if not osp.isdir(root):
            problems.add(name, f'{role} folder {root} does not exist{_relative_to_cwd(root)}.')
            return []
        files = scan_images(root)
        if not files:
            problems.add(name, f'{role} folder {root} is empty (expected image files {", ".join(IMAGE_SUFFIXES)}).')
            return []
        by_stem = {}
        for f in files:
            if stem(f) in by_stem:
                problems.add(name, f'{role} folder {root} holds two images named {stem(f)!r}: '
                             f'{by_stem[stem(f)]} and {f}.')
            by_stem[stem(f)] = f
        listed[role] = by_stem
    pairs, expected_lq = [], set()
    for gt_stem, gt_file in sorted(listed['GT'].items()):
        lq_stem = tmpl.format(gt_stem)
        expected_lq.add(lq_stem)
        lq_file = listed['LQ'].get(lq_stem)
        if lq_file is None:
            problems.add(name, f'GT {osp.join(gt_root, gt_file)} has no LQ partner: expected '
                         f'{osp.join(lq_root, lq_stem)}.<png|tif|jpg|...> (filename_tmpl {tmpl!r}).')
            continue
        pairs.append(Pair(osp.join(lq_root, lq_file), osp.join(gt_root, gt_file), gt_stem))
    for lq_stem, lq_file in sorted(listed['LQ'].items()):
        if lq_stem not in expected_lq:
            problems.add(name, f'LQ {osp.join(lq_root, lq_file)} has no GT partner in {gt_root} '
                         f'(filename_tmpl {tmpl!r}).')
    return pairs


def _pairs_from_meta_info(name, gt_root, lq_root, tmpl, meta_file, problems) -> list[Pair]:
    if not osp.isfile(meta_file):
        problems.add(name, f'meta_info_file {meta_file} does not exist.')
        return []
    with open(meta_file, encoding='utf-8') as f:
        gt_names = [line.split()[0] for line in f if line.strip()]
    if not gt_names:
        problems.add(name, f'meta_info_file {meta_file} lists no images.')
    pairs = []
    for gt_name in gt_names:
        base, ext = osp.splitext(gt_name)
        gt_path, lq_path = osp.join(gt_root, gt_name), osp.join(lq_root, tmpl.format(osp.basename(base)) + ext)
        for path, role in ((gt_path, 'GT'), (lq_path, 'LQ')):
            if not osp.isfile(path):
                problems.add(name, f'{role} file {path} listed (via {meta_file}) does not exist.')
        pairs.append(Pair(lq_path, gt_path, osp.basename(base)))
    return pairs


def _pairs_from_lmdb(name, gt_root, lq_root, verify, problems) -> list[Pair]:
    metas, formats = {}, {}
    for root, role in ((gt_root, 'GT'), (lq_root, 'LQ')):
        if not root.endswith('.lmdb'):
            problems.add(name, f'{role} root {root} must end with .lmdb for io_backend lmdb.')
            return []
        if not osp.isfile(osp.join(root, 'data.mdb')):
            problems.add(name, f'{role} LMDB {root} does not exist (no data.mdb){_relative_to_cwd(root)}.')
            return []
        if not osp.isfile(osp.join(root, META_FILE)):
            problems.add(name, f'{role} LMDB {root} has no meta_info.txt (expected one line "<key>.png (h,w,c) '
                         f'<level>" per image, as written by python -m datprl_arch.tools.make_lmdb).')
            return []
        try:
            metas[role] = read_lmdb_meta(root)
        except ValueError as err:
            problems.add(name, str(err))
            return []
        if not metas[role]:
            problems.add(name, f'{role} LMDB {root} is empty (meta_info.txt lists no images).')
            return []
        if role == 'LQ' and osp.realpath(root) == osp.realpath(gt_root):  # mode noise: one database
            formats[role] = formats['GT']
            continue
        try:
            missing, formats[role], bad = inspect_lmdb(root, metas[role], verify)
        except LmdbError as err:
            problems.add(name, f'{role} {err}')
            return []
        if missing:
            problems.add(name, f'{role} LMDB {root}: {len(missing)} key(s) in meta_info.txt are missing from the '
                         f'database, e.g. {sorted(missing)[:3]}.')
        for message in bad[:MAX_LISTED]:
            problems.add(name, f'{role} {message}')
        if len(bad) > MAX_LISTED:
            problems.add(name, f'{role} LMDB {root}: {len(bad) - MAX_LISTED} more damaged value(s).')
    if osp.realpath(gt_root) != osp.realpath(lq_root):
        _check_lmdb_pair(name, gt_root, lq_root, problems)
    gt_meta, lq_meta = metas['GT'], metas['LQ']
    for key in sorted(set(gt_meta) - set(lq_meta)):
        problems.add(name, f'GT key {key!r} of {gt_root} has no LQ partner in {lq_root}.')
    for key in sorted(set(lq_meta) - set(gt_meta)):
        problems.add(name, f'LQ key {key!r} of {lq_root} has no GT partner in {gt_root}.')
    return [Pair(key, key, key, lq_meta[key][:2], gt_meta[key][:2], formats['LQ'].get(key), formats['GT'].get(key))
            for key in sorted(set(gt_meta) & set(lq_meta))]


def _check_lmdb_pair(name: str, gt_root: str, lq_root: str, problems: Problems) -> None:
    """GT and LQ databases of one make_lmdb build: the LQ's record names the content of the GT it was built with
    (a GT shared by several LQ databases is fine as long as its images are the same). Without records that confirm
    the pair, the leftover of an interrupted ``make_lmdb --overwrite`` swap (``<db>.old-<pid>`` of a dead process)
    is an error too."""
    gt_record, lq_record = read_build_record(gt_root), read_build_record(lq_root)
    paired = bool(gt_record and lq_record and lq_record.get('partner_content'))
    if paired and lq_record['partner_content'] == gt_record.get('content'):
        return  # the records confirm the pair; leftovers of an install that had finished its renames do not matter
    if paired:
        problems.add(name, f'GT LMDB {gt_root} (build {gt_record.get("build", "?")[:8]}) and LQ LMDB {lq_root} (build '
                     f'{lq_record.get("build", "?")[:8]}) come from different make_lmdb runs: the LQ was built '
                     'against other GT images, so pairs would be misaligned. An interrupted make_lmdb --overwrite '
                     'leaves this state: run the same make_lmdb command again (it finishes or undoes the '
                     'interrupted install), or rebuild both databases.')
    for root in (gt_root, lq_root):
        parent = osp.dirname(osp.abspath(root))
        for debris in stale_debris(parent, ('old',), target=root):
            problems.add(name, f'{debris.path} is left over from a make_lmdb install interrupted in process '
                         f'{debris.pid}, so {gt_root} and {lq_root} may come from different builds: run the same '
                         'make_lmdb command again (it finishes or undoes the interrupted install).')


def _relative_to_cwd(path: str) -> str:
    return '' if osp.isabs(path) else f' (relative to the current directory {os.getcwd()})'


def _load_descriptions(name: str, path: str, problems: Problems) -> dict:
    try:
        texts = read_descriptions(path)
    except DescriptionError as err:
        problems.add(name, f'{err}.')
        return {}
    return {stem(k): v for k, v in texts.items()}


def _check_sizes(source: Source, crop: Optional[int], verify: bool, problems: Problems) -> None:
    """Fill in missing sizes (reading headers) and check the scale and crop size for every pair."""
    for pair in source.pairs:
        if source.backend == 'disk':
            try:
                pair.gt_hw = check_file(pair.gt, verify)
                pair.lq_hw = check_file(pair.lq, verify)
            except ImageDecodeError as err:
                problems.add(source.name, str(err))
                continue
            pair.gt_fmt, pair.lq_fmt = file_format(pair.gt), file_format(pair.lq)
        (gh, gw), (lh, lw), s = pair.gt_hw, pair.lq_hw, source.scale
        where = f'LQ {pair.lq} {lh}x{lw} vs GT {pair.gt} {gh}x{gw}'
        if (gh // s, gw // s) != (lh, lw):
            ratio = gh / lh if lh else 0
            hint = (f'; LQ is 1/{ratio:g} of GT: declare scale: {ratio:g} and upsample_lq: true'
                    if s == 1 and ratio > 1 and ratio == int(ratio) else '')
            problems.add(source.name, f'{where}: sizes do not match the declared scale {s} '
                         f'(expected LQ = GT // {s}){hint}.')
            continue
        if crop is not None and min(gh - gh % s, gw - gw % s) < crop:
            problems.add(source.name, f'{where}: crop size gt_size={crop} is larger than the image; use a smaller '
                         f'gt_size or remove the image.')


def format_warnings(source: Source) -> list[str]:
    """Systematic LQ/GT format mismatches of a source that training accepts but that usually mean a wrong folder:
    grayscale LQ with colour GT (or the reverse) and different bit depths (e.g. 16-bit GT with 8-bit LQ)."""
    if source.noise_sigma:  # the LQ is made from the GT
        return []
    known = [p for p in source.pairs if p.gt_fmt is not None and p.lq_fmt is not None]
    channels = [p for p in known if p.gt_fmt.channels != p.lq_fmt.channels]
    depths = [p for p in known if p.gt_fmt.bit_depth != p.lq_fmt.bit_depth]
    warnings, total = [], len(source.pairs)
    if channels:
        p = channels[0]
        gray = 'grayscale LQ with a colour GT' if p.lq_fmt.channels == 1 else 'colour LQ with a grayscale GT'
        warnings.append(f"source '{source.name}': {len(channels)} of {total} pairs have a {gray} (e.g. LQ {p.lq}, "
                        f'GT {p.gt}); grayscale images are replicated to 3 channels, so the network would have to '
                        'invent or drop colour. Check dataroot_lq / dataroot_gt.')
    if depths:
        p = depths[0]
        warnings.append(f"source '{source.name}': {len(depths)} of {total} pairs have a {p.gt_fmt.bit_depth}-bit GT "
                        f'with a {p.lq_fmt.bit_depth}-bit LQ (e.g. LQ {p.lq}, GT {p.gt}); each image is scaled by its '
                        "own range (8-bit / 255, 16-bit / 65535), which is right only if both hold the same "
                        'intensities at different depths. Check dataroot_lq / dataroot_gt.')
    return warnings


def build_source(opt: dict, problems: Problems, crop: Optional[int], verify: bool, defaults: dict) -> Optional[Source]:
    """Discover and validate the pairs of one parsed source entry (see :func:`parse_source`)."""
    name = opt['name']
    io_opt = opt['io_backend']
    noise = opt.get('mode') in GENERATED_MODES  # every GT image pairs with itself; the LQ is made when it is loaded
    tmpl = '{}' if noise else opt.get('filename_tmpl', '{}')
    gt_root = str(opt['dataroot_gt'])
    lq_root = gt_root if noise else str(opt['dataroot_lq'])
    if io_opt['type'] == 'lmdb':
        pairs = _pairs_from_lmdb(name, gt_root, lq_root, verify, problems)
    elif opt.get('meta_info_file'):
        pairs = _pairs_from_meta_info(name, gt_root, lq_root, tmpl, opt['meta_info_file'], problems)
    else:
        pairs = pairs_from_folders(name, gt_root, lq_root, tmpl, problems)
    descriptions = _load_descriptions(name, opt['descriptions'], problems) if opt.get('descriptions') else {}
    source = Source(
        name=name, domain=str(opt.get('domain', defaults['domain'])), task=str(opt.get('task', name)),
        dataroot_gt=gt_root, dataroot_lq=lq_root, backend=io_opt['type'], io_opt=io_opt, pairs=pairs,
        augment_factor=opt['augment_factor'], weight=opt['weight'], scale=opt['scale'],
        upsample_lq=bool(opt.get('upsample_lq', False)), descriptions=descriptions,
        noise_sigma=opt.get('sigma') if opt.get('mode') == 'noise' else None,
        degradation=dict(opt['degradation']) if opt.get('mode') == 'synth' else None)
    if pairs and not any(p.startswith(f'[{name}]') for p in problems.items):
        _check_sizes(source, crop, verify, problems)
    return source
