"""Checks and figures for scripts/gpu_check.sh (the proof on a GPU); needs the standard library, and torch and
PyYAML for some commands, never datprl_arch itself (so it can say what is missing before anything is imported).

    python scripts/gpu_check.py environment [--allow-cpu]     torch, CUDA and GPU; exit 2 without CUDA
    python scripts/gpu_check.py install WHEELS_DIR TARGET      install the prepared wheels this Python lacks (offline)
    python scripts/gpu_check.py imports                        every module the check needs imports; exit 2 if not
    python scripts/gpu_check.py modules MODULE...              every ``python -m`` target resolves
    python scripts/gpu_check.py overrides FILE.yml KEY=VALUE...  every --force_yml entry has its parent keys
    python scripts/gpu_check.py training EXP_DIR --amp bf16|fp16|none --device cuda|cpu [--falling-loss]
                                         [--resumed-from N] [--backend nccl|gloo --step-log FILE]
    python scripts/gpu_check.py speedup FP32_BENCH_LOG COMPILED_BENCH_LOG

Each prints ``key: value`` lines (the figures) to stdout and exits 1 with the reason on stderr when a check fails.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys

NO_CUDA = 2  # exit status: this machine cannot run the GPU check (no CUDA, or modules missing)
MANIFEST = 'manifest.json'  # written by gpu_check_prepare.py beside the wheels
#: One line of BasicSR's MessageLogger: ``[name..][epoch:  0, iter:   1,200, lr:(...)] [eta: ..., time (data):
#: 0.101 (0.002)] l_pix: 1.2e-01 ...`` (the eta can hold a comma: ``-1 day, 23:59:52`` right after a resume).
LOG_LINE = re.compile(r'iter:\s*([\d,]+), lr:\(.*?\)\] (?:\[eta: .*?, time \(data\): ([\d.]+) \([\d.]+\)\] )?(.*)')
LOSS = re.compile(r'(\w+): (\S+)')
CURVE_SHARE = 4  # the loss curve's first and last quarters are compared
FALL_RATIO = 0.9  # the loss "falls" when the last quarter's mean is below this share of the first quarter's
MAX_SCALER_SKIPS = 16  # fp16: GradScaler halvings from its initial scale 2**16 down to 1 (more leave it below 1)
MAX_SKIPPED_SHARE = 0.02  # the non-finite guard's skipped steps tolerated, as a share of the iterations
GLOO_FALLBACK = re.compile(r"dist_params\.backend: '\w+' cannot run on this machine .*; using 'gloo'")
#: Modules the check imports, by the distribution that provides them (what to carry when one is missing).
THIRD_PARTY = {'torch': 'torch', 'torchvision': 'torchvision', 'numpy': 'numpy', 'cv2': 'opencv-python-headless',
               'scipy': 'scipy', 'skimage': 'scikit-image', 'matplotlib': 'matplotlib', 'yaml': 'pyyaml',
               'tqdm': 'tqdm', 'einops': 'einops', 'safetensors': 'safetensors', 'requests': 'requests',
               'PIL': 'pillow', 'lmdb': 'lmdb', 'pytest': 'pytest',
               'sklearn': 'scikit-learn', 'pydicom': 'pydicom', 'mpl_toolkits.basemap_data': 'basemap-data'}
#: basicsr 1.4.2 imports only after the package's compatibility fixes (``import datprl_arch`` first, as the runners do).
BASICSR = ('datprl_arch._compat', 'basicsr')
#: The project's entry points the steps run (importing them imports the rest of what they need).
PROJECT = ('datprl_arch.train', 'datprl_arch.bench', 'datprl_arch.benchmark', 'datprl_arch.mdmini.build',
           'datprl_arch.tools.encode_descriptions')


def _emit(key: str, value) -> None:
    sys.stdout.write(f'{key}: {value}\n')


def _fail(message: str, status: int = 1) -> None:
    sys.stderr.write(f'gpu_check: {message}\n')
    sys.exit(status)


def environment(allow_cpu: bool) -> None:
    """The software and the GPU the figures come from; exits ``NO_CUDA`` without a CUDA device (unless allowed)."""
    import torch
    from torch import distributed

    _emit('python', f'{sys.version.split()[0]} ({sys.executable})')
    _emit('torch', torch.__version__)
    if not torch.cuda.is_available():
        _emit('cuda', 'not available')
        if not allow_cpu:
            _fail('no CUDA device is visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES='
                  f'{os.environ.get("CUDA_VISIBLE_DEVICES")!r}): run this on a GPU machine, or use --dry-run or '
                  '--cpu-smoke.', NO_CUDA)
        return
    nccl = '.'.join(map(str, torch.cuda.nccl.version())) if distributed.is_nccl_available() else 'none'
    _emit('cuda', f'{torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, nccl {nccl}, '
                  f'{torch.cuda.device_count()} GPU(s)')
    props = torch.cuda.get_device_properties(0)
    _emit('gpu', f'{props.name}, compute capability {props.major}.{props.minor}, '
                 f'{props.total_memory / 2**30:.1f} GiB')
    _emit('native bf16', torch.cuda.is_bf16_supported(including_emulation=False))


def _resolves(module: str) -> bool:
    """Whether ``module`` can be found (its parents are imported to look); never raises."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install(wheels_dir: str, target: str) -> None:
    """Install into ``target`` (``pip --target``, from the files only: no index, no dependencies, no network) the
    prepared wheels whose module this Python cannot import; the others are left out, so nothing the image has is
    shadowed. The manifest says which module each wheel provides and for which Python it was prepared."""
    manifest_file = os.path.join(wheels_dir, MANIFEST)
    if not os.path.isfile(manifest_file):
        _fail(f'{manifest_file} does not exist: run `scripts/gpu_check.sh --prepare` on a machine with network '
              'access and carry the folder along', NO_CUDA)
    with open(manifest_file, encoding='utf-8') as f:
        manifest = json.load(f)
    here = '.'.join(map(str, sys.version_info[:2]))
    missing = {name: info for name, info in manifest['wheels'].items() if not _resolves(info['module'])}
    if missing and manifest['python'] != here:
        _fail(f'{wheels_dir} was prepared for Python {manifest["python"]}, this is Python {here}, which lacks '
              f'{sorted(i["module"] for i in missing.values())}: run '
              f'`scripts/gpu_check.sh --prepare --python-version {here}`', NO_CUDA)
    if missing:
        command = [sys.executable, '-m', 'pip', 'install', '--no-index', '--no-deps', '--no-cache-dir', '--quiet',
                   '--disable-pip-version-check', '--upgrade', '--target', target,
                   *[os.path.join(wheels_dir, name) for name in sorted(missing)]]
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX='1')
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            _fail(f'pip could not install {sorted(missing)} into {target}:\n{done.stdout}{done.stderr}', NO_CUDA)
    _emit('installed from the prepared wheels', ', '.join(sorted(i['module'] for i in missing.values())) or 'none')
    _emit('already here', ', '.join(sorted(i['module'] for n, i in manifest['wheels'].items() if n not in missing))
          or 'none')


def imports() -> None:
    """Import every module the check needs; exits ``NO_CUDA`` with the list of those that do not import (and the
    distribution to carry for each), before any step runs."""
    missing = []
    for module, distribution in [*THIRD_PARTY.items(), *((m, 'basicsr==1.4.2') for m in BASICSR)]:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: B902  (a broken install raises more than ImportError)
            missing.append(f'{module} (pip: {distribution}; {type(err).__name__}: {err})')
    if not missing:
        for module in PROJECT:
            try:
                importlib.import_module(module)
            except Exception as err:  # noqa: B902
                missing.append(f'{module} ({type(err).__name__}: {err})')
    if missing:
        _fail(f'{len(missing)} module(s) do not import; nothing was run:\n  ' + '\n  '.join(missing)
              + '\nCarry the missing packages as wheels (scripts/gpu_check.sh --prepare) or install them.', NO_CUDA)
    _emit('imports', f'{len(THIRD_PARTY) + 1} packages and {len(PROJECT)} entry points import')


def modules(names: list[str]) -> None:
    """Every ``python -m`` target of the steps resolves (``importlib.util.find_spec``)."""
    unresolved = [name for name in dict.fromkeys(names) if not _resolves(name)]
    if unresolved:
        _fail(f'python -m target(s) that do not resolve: {", ".join(unresolved)}')
    _emit('python -m targets', f'{len(set(names))} resolve')


def overrides(option_file: str, entries: list[str]) -> None:
    """BasicSR's ``--force_yml`` sets ``opt[k1][k2]... = value`` and cannot create the parents: check them."""
    import yaml

    with open(option_file, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    for entry in entries:
        if entry.count('=') != 1:
            _fail(f'--force_yml entry {entry!r}: expected KEY[:KEY...]=VALUE')
        keys = entry.split('=')[0].split(':')
        node = opt
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node, dict) or key not in node:
                _fail(f'--force_yml entry {entry!r}: {":".join(keys[:depth + 1])} is not in {option_file}')
            node = node[key]
        if not isinstance(node, dict):
            _fail(f'--force_yml entry {entry!r}: {":".join(keys[:-1])} in {option_file} is not a mapping')
    _emit('overrides', f'{len(entries)} apply to {option_file}')


def _log_points(log_files: list[str]) -> dict[int, tuple[float | None, dict]]:
    """{iteration: (seconds per iteration, {term: value})} of every logged training line; a later log (a resumed
    run) replaces the iterations it logged again."""
    points = {}
    for log_file in log_files:
        with open(log_file, encoding='utf-8') as f:
            for line in f:
                match = LOG_LINE.search(line)
                if match:
                    terms = {k: float(v) for k, v in LOSS.findall(match.group(3))}
                    points[int(match.group(1).replace(',', ''))] = (match.group(2) and float(match.group(2)), terms)
    return dict(sorted(points.items()))


def _check_amp(text: str, where: str, amp: str, device: str) -> None:
    """The model's log line for the run's dtype: autocast on CUDA; on the CPU autocast, or its float32 notice."""
    if amp == 'none':
        return
    autocast = f'use_amp: autocast in {amp} on {device}.'
    if autocast in text:
        _emit('autocast', f'{amp} on {device}')
    elif device == 'cpu' and re.search(rf'use_amp \({amp}\): .*; training in float32\.', text):
        _emit('autocast', f'{amp} is not fast on this CPU: float32 (as the log says)')
    else:
        _fail(f'{where}: no "{autocast}" line: the run did not train in {amp}')


def _check_falling(pixel: list[float], where: str) -> None:
    """The mean of the last quarter of the logged ``l_pix`` is below ``FALL_RATIO`` x the first quarter's."""
    share = max(len(pixel) // CURVE_SHARE, 1)
    first, last = statistics.mean(pixel[:share]), statistics.mean(pixel[-share:])
    ratio = last / first if first > 0 else math.inf
    _emit('l_pix first/last quarter', f'{first:.4e} -> {last:.4e} (ratio {ratio:.3f}; falls below {FALL_RATIO})')
    if not ratio < FALL_RATIO:
        _fail(f'{where}: l_pix did not fall by a margin: last quarter {last:.4e} is not below {FALL_RATIO} x the '
              f'first quarter {first:.4e} ({len(pixel)} logged iterations)')


def _check_state(exp_dir: str, guard_skips: int) -> None:
    """The newest training state: the optimizer stepped at every iteration but the skipped ones (the guard's, and
    with fp16 at most ``MAX_SCALER_SKIPS`` of the GradScaler's), and fp16's loss scale is still at least 1."""
    import torch

    states = glob.glob(os.path.join(exp_dir, 'training_states', '*.state'))
    if not states:
        _fail(f'{exp_dir}/training_states: no training state (save_checkpoint_freq must divide the iterations)')
    newest = max(states, key=lambda path: int(os.path.basename(path).split('.')[0]))
    state = torch.load(newest, map_location='cpu', weights_only=True)
    iters = int(state['iter'])
    steps = [float(s['step']) for s in state['optimizers'][0]['state'].values() if 'step' in s]
    steps = int(max(steps)) if steps else 0
    scaler = state.get('scaler') or {}
    _emit('optimizer steps', f'{steps} of {iters} iterations ({newest})')
    allowed = guard_skips + (MAX_SCALER_SKIPS if scaler else 0)
    if steps > iters or iters - steps > allowed:
        _fail(f'{newest}: the optimizer stepped {steps} times in {iters} iterations; at most {allowed} skipped '
              f'steps are expected ({guard_skips} logged by the non-finite guard'
              f'{f", {MAX_SCALER_SKIPS} for the GradScaler" if scaler else ""})')
    if scaler:
        _emit('GradScaler scale', scaler['scale'])
        if not scaler['scale'] >= 1:
            _fail(f'{newest}: the GradScaler scale fell to {scaler["scale"]} (< 1): fp16 gradients overflow')


def _finite_weights(checkpoint: str) -> int:
    """Number of tensors in the checkpoint's ``params`` and ``params_ema``; fails on any non-finite value."""
    import torch

    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    count = 0
    for key in ('params', 'params_ema'):
        for name, tensor in state.get(key, {}).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                _fail(f'{checkpoint}: {key}.{name} holds non-finite values')
            count += 1
    return count


def _check_backend(step_log: str, backend: str) -> None:
    """A run asked for ``backend``: its output must not hold the warning of a fall-back to gloo."""
    with open(step_log, encoding='utf-8', errors='replace') as f:
        fallback = GLOO_FALLBACK.search(f.read())
    if fallback:
        _fail(f'{step_log}: {fallback.group(0)}: the run did not use {backend}')
    _emit('process group', f'{backend} (no fall-back)')


def _validation_average(exp_dir: str) -> None:
    metrics = os.path.join(exp_dir, 'metrics.json')
    if not os.path.isfile(metrics):
        return
    with open(metrics, encoding='utf-8') as f:
        rounds = json.load(f)
    last_round = list(rounds)[-1] if rounds else None
    if last_round is not None and isinstance(rounds[last_round], dict) and rounds[last_round].get('average'):
        average = ', '.join(f'{k} {v:.4f}' for k, v in rounds[last_round]['average'].items())
        _emit(f'validation average at {last_round}', average)


def training(args: argparse.Namespace) -> None:
    """Figures and checks of one training run in ``args.exp_dir`` (all its logs: a resumed run is checked over its
    whole curve): the autocast line, a loss falling by a margin, the optimizer's step count and fp16's loss scale
    from the saved training state, no fall-back to gloo, finite latest weights."""
    logs = sorted(glob.glob(os.path.join(args.exp_dir, 'train_*.log')), key=os.path.getmtime)
    if not logs:
        _fail(f'{args.exp_dir}: no train_*.log (did the training start?)')
    with open(logs[-1], encoding='utf-8') as f:
        text = f.read()
    if args.resumed_from is not None and not re.search(
            rf'Resuming training from epoch: \d+, iter: {args.resumed_from}\.', text):
        _fail(f'{logs[-1]}: the run did not resume from iteration {args.resumed_from}')
    _check_amp(text, logs[-1], args.amp, args.device)
    points = _log_points(logs)
    if not points:
        _fail(f'{logs[-1]}: no logged training iteration')
    _emit('iterations logged', f'{min(points)}..{max(points)} ({len(points)} lines in {len(logs)} log(s))')
    times = [t for t, _ in list(points.values())[len(points) // 2:] if t is not None]
    if times:
        _emit('s/iter (median, second half)', f'{statistics.median(times):.4f}')
    pixel = [terms['l_pix'] for _, terms in points.values() if 'l_pix' in terms]
    if not all(math.isfinite(v) for v in pixel):
        _fail(f'{logs[-1]}: a logged l_pix is not finite')
    if args.falling_loss:
        if not pixel:
            _fail(f'{logs[-1]}: no l_pix logged')
        _check_falling(pixel, ', '.join(logs))
    guard_skips = sum(open(log, encoding='utf-8').read().count('step skipped') for log in logs)
    _emit('steps skipped by the non-finite guard', guard_skips)
    if guard_skips > MAX_SKIPPED_SHARE * max(points):
        _fail(f'{args.exp_dir}: {guard_skips} steps skipped for non-finite values in {max(points)} iterations')
    _check_state(args.exp_dir, guard_skips)
    if args.backend:
        _check_backend(args.step_log, args.backend)
    checkpoint = os.path.join(args.exp_dir, 'models', 'net_g_latest.pth')
    if not os.path.isfile(checkpoint):
        _fail(f'{checkpoint} was not written')
    _emit('finite weight tensors (params + params_ema)', _finite_weights(checkpoint))
    _validation_average(args.exp_dir)


def _bench_rows(log_file: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(config, impl): {column: value}} of the network table(s) in a ``datprl_arch.bench`` log."""
    rows, header = {}, None
    with open(log_file, encoding='utf-8', errors='replace') as f:
        for line in f:
            cells = [c.strip() for c in line.split('|')]
            if line.strip() and set(line.strip()) <= set('-+'):
                continue  # the rule under a header
            if len(cells) < 3:
                header = None
            elif cells[:2] == ['config', 'impl']:
                header = cells
            elif header:
                values = {}
                for name, cell in zip(header[2:], cells[2:]):
                    try:
                        values[name] = float(cell)
                    except ValueError:
                        continue
                rows.setdefault((cells[0], cells[1]), values)  # the first table of a log wins (fp32)
    return rows


def speedup(fp32_log: str, compiled_log: str, config: str = '6t') -> None:
    """Eval and train-step speed-up of ours (bf16 + compile) over the official computation in float32: a figure
    (the issue's target is 3x), not a pass criterion."""
    official = _bench_rows(fp32_log).get((config, 'official'))
    ours = _bench_rows(compiled_log).get((config, 'datprl'))
    if not official or not ours:
        _fail(f'no {config} official row in {fp32_log} or no {config} datprl row in {compiled_log}')
    for kind in ('eval', 'train'):
        column = next((c for c in official if c.startswith(kind + ' ms')), None)
        if column and column in ours and ours[column] > 0:
            _emit(f'{kind}: ours bf16 + compile vs official fp32 ({column})',
                  f'{official[column] / ours[column]:.2f}x (target 3x)')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('environment').add_argument('--allow-cpu', action='store_true')
    inst = commands.add_parser('install')
    inst.add_argument('wheels_dir')
    inst.add_argument('target')
    commands.add_parser('imports')
    commands.add_parser('modules').add_argument('names', nargs='+')
    over = commands.add_parser('overrides')
    over.add_argument('option_file')
    over.add_argument('entries', nargs='+')
    train = commands.add_parser('training')
    train.add_argument('exp_dir')
    train.add_argument('--amp', choices=('bf16', 'fp16', 'none'), required=True)
    train.add_argument('--device', choices=('cuda', 'cpu'), required=True)
    train.add_argument('--falling-loss', action='store_true')
    train.add_argument('--resumed-from', type=int)
    train.add_argument('--backend', help='the process group asked for (with --step-log: fail on a fall-back)')
    train.add_argument('--step-log', help="the step's own output (stdout and stderr)")
    speed = commands.add_parser('speedup')
    speed.add_argument('fp32_log')
    speed.add_argument('compiled_log')
    args = parser.parse_args(argv)
    if args.command == 'training' and args.backend and not args.step_log:
        parser.error('training --backend needs --step-log')
    handlers = {'environment': lambda: environment(args.allow_cpu),
                'install': lambda: install(args.wheels_dir, args.target), 'imports': imports,
                'modules': lambda: modules(args.names),
                'overrides': lambda: overrides(args.option_file, args.entries), 'training': lambda: training(args),
                'speedup': lambda: speedup(args.fp32_log, args.compiled_log)}
    handlers[args.command]()


if __name__ == '__main__':
    main()
