"""The benchmark: a test option file's sets, one or more checkpoints, each image's restored output AND degraded
input scored against the ground truth, the statistics and the report files.

``run_benchmark`` builds the sets with BasicSR's ``build_dataset`` / ``build_dataloader`` and, per checkpoint, the
model with BasicSR's ``build_model`` (the option file's ``model_type``), then runs the model's test path for every
image: ``feed_data(batch); test(); output``. A checkpoint that carries its network options (``network_g``, written
by this package) is rebuilt from them, so checkpoints of different networks are compared on one test option file;
otherwise the option file's ``network_g`` is used.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import os.path as osp
import platform
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model
from basicsr.utils import get_root_logger, set_random_seed, tensor2img
from basicsr.utils.logger import initialized_logger

from ..data.sources import DataSourceError
from ..inference.calibration import BenchmarkDetection
from ..inference.whole_image import min_tiled_pixels
from ..options import OptionFileError, load_option_file
from ..utils.checkpoint import STAGES_KEY, CheckpointError, file_sha256, network_options, read_checkpoint
from ..utils.folders import archive_and_create
from ..utils.precision import AMP_DTYPES, amp_problem, autocast, use_tf32
from ..weights import RELEASE, resolve_checkpoint
from .aggregate import aggregates, summarize_set
from .detection import confusion_path, write_confusion
from .metrics import NATIVE, metric_bits_note, parse_metric_bits, score, upsample_to
from .report import write_reports
from .samples import Sample, write_samples

#: The BasicSR metric types the benchmark reports, by metric name, and their options when ``val.metrics`` has none.
METRIC_TYPES = OrderedDict([('psnr', 'calculate_psnr'), ('ssim', 'calculate_ssim')])
DEFAULT_METRIC_OPT = {'crop_border': 0, 'test_y_channel': False}
#: ``param_key_g`` used when the option file names none: EMA weights first, then BasicSR's ``params``.
DEFAULT_PARAM_KEY = 'params_ema'
#: Read size of the checkpoint hash.
LOG_NAME = 'benchmark.log'


class BenchmarkError(ValueError):
    """A benchmark that cannot run as asked; the message names the file or option to change."""


@dataclass
class CheckpointInfo:
    """One checkpoint of a benchmark: where it is, its label in the tables and the network it is built as."""

    path: str
    label: str
    sha256: str
    network_opt: dict
    network_source: str  # 'checkpoint' (its network_g) or 'option file'
    parameters: int = 0
    training_stages: list = field(default_factory=list)  # train.stages plan with trainable parameters, if any


@dataclass
class SetRow:
    """One source of one test dataset: a row of the report (per checkpoint)."""

    key: tuple  # (dataset key in the option file, source index)
    name: str
    domain: str
    task: str
    bit_depth: int = 8
    input_upsampled: bool = False  # LQ smaller than GT: bicubic-upsampled for scoring
    dataset_upsampled: bool = False  # the dataset upsampled LQ already (upsample_lq)
    images: list = field(default_factory=list)  # image names in loader order
    inputs: list = field(default_factory=list)  # per image {'psnr': .., 'ssim': ..} of the input
    outputs: dict = field(default_factory=dict)  # checkpoint label -> per image {'psnr': .., 'ssim': ..}


def checkpoint_labels(paths: Sequence[str]) -> list[str]:
    """Short unique labels: file stems, with as many parent folders as needed to tell them apart."""
    parts = [osp.normpath(osp.abspath(p)).split(os.sep) for p in paths]
    parts = [p[:-1] + [osp.splitext(p[-1])[0]] for p in parts]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ['/'.join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f'{label} #{i + 1}' for i, label in enumerate(labels)]  # the same file given twice


def benchmark_metric_opts(opt: dict) -> tuple[OrderedDict, dict]:
    """The PSNR and SSIM options of ``val.metrics`` (crop border, Y channel), defaults where the file has none;
    and where each came from."""
    metrics = (opt.get('val') or {}).get('metrics') or {}
    chosen, origin = OrderedDict(), {}
    for name, metric_type in METRIC_TYPES.items():
        found = next((dict(m) for m in metrics.values() if isinstance(m, dict) and m.get('type') == metric_type),
                     None)
        chosen[name] = found or dict(DEFAULT_METRIC_OPT, type=metric_type)
        origin[name] = 'option file' if found else 'default'
    return chosen, origin


def resolve_device(device: Optional[str]) -> str:
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device not in ('cpu', 'cuda'):
        raise BenchmarkError(f"--device {device!r}: use 'cpu' or 'cuda'.")
    if device == 'cuda' and not torch.cuda.is_available():
        raise BenchmarkError('--device cuda: no CUDA device is available; use --device cpu.')
    return device


def _inspect_checkpoints(names: Sequence[str], option_network: Optional[dict], option_file: str):
    """What each checkpoint given is (``release``: the shipped model, labelled so)."""
    labels = checkpoint_labels(names)
    infos = []
    for name, label in zip(names, labels):
        path = resolve_checkpoint(name)
        checkpoint = read_checkpoint(path)  # CheckpointError names a missing / unreadable file
        carried = network_options(checkpoint)
        if carried is None and not option_network:
            raise BenchmarkError(f'{path} carries no network options and {option_file} has no network_g: the '
                                 'network to load it into is unknown.')
        network = carried or dict(option_network)
        infos.append(CheckpointInfo(path, label, file_sha256(path), network,
                                    'checkpoint' if carried else 'option file',
                                    training_stages=list(checkpoint.get(STAGES_KEY) or [])
                                    if isinstance(checkpoint, dict) else []))
    return infos


def _init_logger(results_dir: str):
    """BasicSR's root logger. Started here (the command), it writes everything to ``benchmark.log`` and only
    warnings to the console (the table is the command's product); a logger the caller started is left as it is."""
    fresh = 'basicsr' not in initialized_logger
    logger = get_root_logger(log_file=osp.join(results_dir, LOG_NAME))
    if fresh:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
    return logger


def _test_options(opt: dict, option_file: str, results_dir: str, device: str) -> dict:
    """The option dict as BasicSR's ``parse_options`` leaves it for testing, on ``device``."""
    opt = copy.deepcopy(opt)
    opt.update(is_train=False, dist=False, rank=0, world_size=1, auto_resume=False,
               num_gpu=1 if device == 'cuda' else 0)
    path = dict(opt.get('path') or {})
    path.update(results_root=results_dir, log=results_dir, visualization=osp.join(results_dir, 'visualization'))
    path.setdefault('param_key_g', DEFAULT_PARAM_KEY)
    opt['path'] = path
    datasets = opt.get('datasets')
    if not isinstance(datasets, dict) or not datasets:
        raise BenchmarkError(f'{option_file}: no datasets (expected datasets: {{test_x: {{...}}, ...}}).')
    for key, dataset in datasets.items():
        if not isinstance(dataset, dict):
            raise BenchmarkError(f'{option_file}: datasets.{key} must be a mapping, found {dataset!r}.')
        dataset['phase'] = key.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for root in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(root) is not None:
                dataset[root] = osp.expanduser(dataset[root])
    return opt


def _build_sets(opt: dict, option_file: str):
    """``(dataset key, loader, rows by source index)`` per test set (every non-train entry of ``datasets``)."""
    sets = []
    for key, dataset_opt in opt['datasets'].items():
        if dataset_opt['phase'] == 'train':
            continue
        try:
            dataset = build_dataset(dataset_opt)
        except (DataSourceError, KeyError, OSError, ValueError) as err:
            raise BenchmarkError(f'{option_file}: datasets.{key} cannot be read: {err}') from err
        loader = build_dataloader(dataset, dataset_opt, num_gpu=opt['num_gpu'], dist=False, sampler=None,
                                  seed=opt.get('manual_seed'))
        set_name = dataset_opt.get('name', key)
        sources = getattr(dataset, 'sources', None)
        if sources:
            rows = {i: SetRow((key, i), set_name if len(sources) == 1 else f'{set_name}/{s.name}', s.domain, s.task,
                              dataset_upsampled=bool(s.upsample_lq and s.scale > 1))
                    for i, s in enumerate(sources)}
        else:  # a dataset without sources (e.g. BasicSR's PairedImageDataset): one row
            rows = {0: SetRow((key, 0), set_name, dataset_opt.get('domain', 'all'), dataset_opt.get('task', set_name))}
        sets.append((key, loader, rows))
    if not sets:
        raise BenchmarkError(f'{option_file}: no test sets (datasets entries other than train).')
    return sets


def _display(tensor: torch.Tensor) -> np.ndarray:
    """``[1, C, H, W]`` RGB tensor -> ``(H, W, C)`` BGR float in ``[0, 1]`` for the sample picture."""
    img = tensor2img(tensor, out_type=np.float32)
    return img[..., None] if img.ndim == 2 else img


def _build_model(model_opt: dict, info: CheckpointInfo, option_file: str):
    try:
        return build_model(model_opt)
    except CheckpointError:
        raise
    except (KeyError, TypeError) as err:
        origin = 'the checkpoint' if info.network_source == 'checkpoint' else f'the option file {option_file}'
        raise BenchmarkError(f'{info.path}: network {info.network_opt.get("type")!r} (network_g of {origin}) '
                             f'cannot be built: {err}') from err


def _label_prompt(model, info: CheckpointInfo, task: str):
    """``fixed_prompt`` of task ``task``'s own prompt (``--task-prompts``), for a mode with a prompt per task."""
    from ..inference.prompt_control import PromptChoiceError, task_prompt

    net = model._tested_net()
    try:
        return net.fixed_prompt(task_prompt(net, task).to(next(net.parameters()).device))
    except PromptChoiceError as err:
        raise BenchmarkError(f'--task-prompts, {info.path}: {err}') from None


def _evaluate(model, info: CheckpointInfo, sets, metric_opts, metric_bits: str, first: bool,
              samples: dict, quiet: bool, amp_context, task_prompts: bool = False, detection=None) -> None:
    """Score every image of every set with ``model`` (its test path run inside ``amp_context``; with
    ``task_prompts`` under the prompt of each set's task); the input's scores on the first checkpoint's pass; keeps
    the image of largest PSNR gain per set (first checkpoint) for the sample picture. ``detection``
    (:class:`~datprl_arch.inference.calibration.BenchmarkDetection`, checkpoints with a head) sees every image."""
    total = sum(len(loader) for _, loader, _ in sets)
    with tqdm(total=total, desc=info.label, unit='img', disable=quiet, dynamic_ncols=True) as bar:
        for key, loader, rows in sets:
            for index, batch in enumerate(loader):
                if 'gt' not in batch:
                    raise BenchmarkError(f'datasets.{key}: items have no ground truth (gt); the benchmark needs it.')
                row = rows[int(batch['source'][0]) if 'source' in batch else 0]
                image = osp.basename(str(batch['lq_path'][0]))
                where = f'[{row.name}] {image}'
                bit_depth = int(batch['bit_depth'][0]) if 'bit_depth' in batch else 8
                model.feed_data(batch)
                with amp_context, (_label_prompt(model, info, row.task) if task_prompts else nullcontext()):
                    model.test()
                if detection is not None:
                    detection.observe(row.name, row.domain, row.task, batch['lq'])
                output, gt = model.output.detach().float().cpu(), batch['gt']
                if output.shape[-2:] != gt.shape[-2:]:
                    raise BenchmarkError(f'{info.path} on {where}: the output is {tuple(output.shape[-2:])}, the '
                                         f'ground truth {tuple(gt.shape[-2:])} (H, W); check the scale of the '
                                         'network and of the dataset (scale, upsample_lq).')
                out_scores = score(output, gt, metric_opts, bit_depth, metric_bits, f'{where} (restored)')
                row.outputs.setdefault(info.label, []).append(out_scores)
                if first:
                    lq = batch['lq']
                    if lq.shape[-2:] != gt.shape[-2:]:
                        lq, row.input_upsampled = upsample_to(lq, tuple(gt.shape[-2:])), True
                    row.bit_depth = bit_depth
                    row.images.append(image)
                    in_scores = score(lq, gt, metric_opts, bit_depth, metric_bits, f'{where} (input)')
                    row.inputs.append(in_scores)
                    gain = (None if in_scores['psnr'] is None or out_scores['psnr'] is None
                            else out_scores['psnr'] - in_scores['psnr'])
                    best = samples.get(row.key)
                    if gain is not None and (best is None or gain > best.gain):
                        samples[row.key] = Sample(row.name, row.domain, row.task, image, index, bit_depth,
                                                  _display(lq), _display(gt), in_scores['psnr'], gain,
                                                  {info.label: _display(output)}, {info.label: out_scores['psnr']})
                elif row.key in samples and samples[row.key].index == index:
                    samples[row.key].outputs[info.label] = _display(output)
                    samples[row.key].psnr_out[info.label] = out_scores['psnr']
                for attr in ('lq', 'gt', 'output'):
                    if hasattr(model, attr):
                        delattr(model, attr)
                bar.update()


def _versions() -> dict:
    from importlib import metadata

    import basicsr

    try:
        datprl = metadata.version('datprl')
    except metadata.PackageNotFoundError:
        datprl = 'unknown (not installed)'
    return {'datprl': datprl, 'basicsr': getattr(basicsr, '__version__', 'unknown'), 'torch': torch.__version__,
            'python': platform.python_version()}


def _rows(sets, infos) -> tuple[list, list]:
    """Set rows (per checkpoint, in checkpoint order) and per-image scores."""
    rows, images = [], []
    for info in infos:
        for _, _, set_rows in sets:
            for row in set_rows.values():
                if not row.images:
                    continue
                per_image = [{'psnr_in': i['psnr'], 'psnr_out': o['psnr'], 'ssim_in': i['ssim'],
                              'ssim_out': o['ssim']} for i, o in zip(row.inputs, row.outputs[info.label])]
                rows.append({'set': row.name, 'dataset': row.key[0], 'domain': row.domain, 'task': row.task,
                             'checkpoint': info.label, 'network': info.network_opt['type'],
                             'bit_depth': row.bit_depth, 'input_upsampled': row.input_upsampled,
                             **summarize_set(per_image)})
                images += [{'checkpoint': info.label, 'set': row.name, 'image': name, **scores}
                           for name, scores in zip(row.images, per_image)]
    return rows, images


def _notes(sets) -> list[str]:
    all_rows = [r for _, _, rows in sets for r in rows.values()]
    notes = []
    upsampled = [r.name for r in all_rows if r.input_upsampled]
    if upsampled:
        notes.append('Input bicubic-upsampled to the ground-truth size for scoring (LQ smaller than GT): '
                     + ', '.join(upsampled) + '.')
    by_dataset = [r.name for r in all_rows if r.dataset_upsampled]
    if by_dataset:
        notes.append('Input as the dataset gives it, already bicubic-upsampled (upsample_lq: true): '
                     + ', '.join(by_dataset) + '.')
    empty = [r.name for r in all_rows if not r.images]
    if empty:
        notes.append('No images (left out): ' + ', '.join(empty) + '.')
    return notes


def _check_max_pixels(max_pixels: Optional[int]) -> None:
    if max_pixels is not None and max_pixels < min_tiled_pixels():
        raise BenchmarkError(f'--max-pixels {max_pixels}: expected at least {min_tiled_pixels()} (tiles must be '
                             'larger than their overlap).')


def _tiling_and_tf32(test_opt: dict, max_pixels: Optional[int], tf32: bool, device: str, logger) -> None:
    """``--max-pixels`` as ``val.max_pixels`` (``DATPRLModel.test`` tiles the images above it under their whole-image
    prompt) and ``--tf32`` (:func:`~datprl_arch.utils.precision.use_tf32`), both said in the log."""
    if max_pixels is not None:
        test_opt['val'] = dict(test_opt.get('val') or {}, max_pixels=max_pixels)
    if (test_opt.get('val') or {}).get('max_pixels') is not None:
        logger.info(f"Images above {test_opt['val']['max_pixels']} pixels are restored in tiles under the prompt "
                    'of the whole image.')
    if tf32:
        logger.info(use_tf32(torch.device(device)))


def run_benchmark(option_file: str, checkpoints: Sequence[str] = (), name: Optional[str] = None,
                  metric_bits: str = NATIVE, device: Optional[str] = None, quiet: bool = False,
                  root: Optional[str] = None, amp: Optional[str] = None, task_prompts: bool = False,
                  threads: Optional[int] = None, max_pixels: Optional[int] = None, tf32: bool = False) -> dict:
    """Benchmark ``checkpoints`` (default: the option file's ``path.pretrain_network_g``, else the shipped release
    model; ``release`` names it, :mod:`datprl_arch.weights`) on the test sets of
    ``option_file`` against the degraded input; writes ``report.md``, ``report.csv``, ``report.json`` and
    ``samples.png`` under ``<root>/results/<name>/`` (root: the current directory; an existing folder is first
    moved to ``<name>_archived_<time>``, as BasicSR's runners do) and returns the report dict (as in ``report.json``,
    with ``files``: the paths written, and ``archived``: where the earlier results went, or None). ``amp`` (bf16,
    fp16): the networks run under autocast in that dtype, where the device supports it
    (:mod:`datprl_arch.utils.precision`). ``task_prompts``: restore each set under its task's own prompt (the
    label; networks whose prompt mode has a prompt per task) instead of the one the network picks. ``threads``: the
    CPU threads the caller set (logged and reported). ``max_pixels``: images above it are restored in tiles under
    their whole-image prompt, as the restore command does (default: the option file's ``val.max_pixels``, else whole
    images). ``tf32``: float32 work on CUDA in TF32 (:func:`~datprl_arch.utils.precision.use_tf32`).

    Raises ``OptionFileError``, ``CheckpointError``, ``DataSourceError``, ``OutputFolderError`` (a results folder
    that cannot be written) or :class:`BenchmarkError` with a message naming the file for bad input."""
    opt = load_option_file(option_file)
    try:
        metric_bits = parse_metric_bits(metric_bits, '--metric-bits')
    except ValueError as err:
        raise BenchmarkError(str(err)) from None
    name = name or opt.get('name')
    if not name:
        raise OptionFileError(f'{option_file}: no name; give one in the file or with --name.')
    path_opt = opt.get('path') or {}
    checkpoints = list(checkpoints) or [path_opt.get('pretrain_network_g') or RELEASE]
    checkpoints = [osp.expanduser(c) for c in checkpoints]
    infos = _inspect_checkpoints(checkpoints, opt.get('network_g'), option_file)
    device = resolve_device(device)
    _check_max_pixels(max_pixels)
    problem = amp_problem(torch.device(device), amp) if amp is not None else None
    if problem:
        raise BenchmarkError(f'--amp {amp}: {problem}')
    amp_context = autocast(torch.device(device), AMP_DTYPES[amp] if amp else None)
    results_dir = osp.join(root or os.getcwd(), 'results', name)
    archived = archive_and_create(results_dir, 'the results folder')  # as BasicSR's runners: never in place
    logger = _init_logger(results_dir)
    if archived:
        logger.info(f'{results_dir} existed: the earlier results were moved to {archived}.')
    logger.info(f'Benchmark {name}: {option_file}, {len(infos)} checkpoint(s), device {device}, '
                f'{amp or "float32"}, {threads or torch.get_num_threads()} CPU threads. '
                f'{metric_bits_note(metric_bits)}')
    test_opt = _test_options(opt, option_file, results_dir, device)
    _tiling_and_tf32(test_opt, max_pixels, tf32, device, logger)
    set_random_seed(int(test_opt.get('manual_seed') or 0))
    metric_opts, metric_origin = benchmark_metric_opts(test_opt)
    sets = _build_sets(test_opt, option_file)
    samples: dict = OrderedDict()
    detections: dict = OrderedDict()  # checkpoint label -> detection summary, for checkpoints with a head
    for number, info in enumerate(infos):
        model_opt = copy.deepcopy(test_opt)
        model_opt['network_g'] = copy.deepcopy(info.network_opt)
        model_opt['path']['pretrain_network_g'] = info.path
        model = _build_model(model_opt, info, option_file)
        info.parameters = sum(p.numel() for p in model.get_bare_model(model.net_g).parameters())
        logger.info(f'Checkpoint {info.label}: {info.path}, network {info.network_opt["type"]} '
                    f'({info.parameters:,} parameters, network_g from the {info.network_source})')
        detection = BenchmarkDetection.of(info.path, model, device, amp)
        _evaluate(model, info, sets, metric_opts, metric_bits, number == 0, samples, quiet, amp_context,
                  task_prompts, detection)
        if detection is not None:
            detections[info.label] = detection.summary()
        del model
    rows, images = _rows(sets, infos)
    report = {
        'name': name, 'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'option_file': osp.abspath(option_file), 'device': device, 'amp': amp or 'none',
        'threads': threads or torch.get_num_threads(),
        'task_prompts': task_prompts,
        'model_type': test_opt.get('model_type'),
        'metric_bits': metric_bits, 'metric_note': metric_bits_note(metric_bits),
        'metrics': {m: {**metric_opts[m], 'from': metric_origin[m]} for m in metric_opts},
        'param_key': test_opt['path']['param_key_g'], 'versions': _versions(),
        'checkpoints': [{'label': i.label, 'path': osp.abspath(i.path), 'sha256': i.sha256,
                         'network': i.network_opt['type'], 'network_from': i.network_source,
                         'parameters': i.parameters, 'training_stages': i.training_stages} for i in infos],
        'notes': _notes(sets), 'rows': rows, 'aggregates': aggregates(rows), 'images': images,
        'detection': detections,
    }
    files = write_reports(report, results_dir)
    files['samples_png'] = write_samples(list(samples.values()), [i.label for i in infos],
                                         osp.join(results_dir, 'samples.png'))
    if detections:
        files['confusion_png'] = write_confusion(detections, confusion_path(results_dir))
    report['files'] = files
    report['archived'] = archived
    logger.info(f'Benchmark written to {results_dir}')
    return report
