"""Checks and figures for scripts/gpu_check.sh (the proof on a GPU); needs torch and PyYAML only, not datprl_arch.

    python scripts/gpu_check.py environment [--allow-cpu]     torch, CUDA and GPU; exit 2 without CUDA
    python scripts/gpu_check.py overrides FILE.yml KEY=VALUE...  every --force_yml entry has its parent keys
    python scripts/gpu_check.py training EXP_DIR [--falling-loss] [--resumed-from N]
                                                            loss curve, s/iter, finite weights, validation average

Each prints ``key: value`` lines (the figures) to stdout and exits 1 with the reason on stderr when a check fails.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

NO_CUDA = 2  # exit status: this machine cannot run the GPU check
#: One line of BasicSR's MessageLogger: ``[name..][epoch:  0, iter:   1,200, lr:(...)] [eta: ..., time (data):
#: 0.101 (0.002)] l_pix: 1.2e-01 ...`` (the eta can hold a comma: ``-1 day, 23:59:52`` right after a resume).
LOG_LINE = re.compile(r'iter:\s*([\d,]+), lr:\(.*?\)\] (?:\[eta: .*?, time \(data\): ([\d.]+) \([\d.]+\)\] )?(.*)')
LOSS = re.compile(r'(\w+): (\S+)')
CURVE_SHARE = 4  # the loss "falls" when the mean of the last quarter of logged points is below the first quarter's


def _emit(key: str, value) -> None:
    sys.stdout.write(f'{key}: {value}\n')


def _fail(message: str, status: int = 1) -> None:
    sys.stderr.write(f'gpu_check: {message}\n')
    sys.exit(status)


def environment(allow_cpu: bool) -> None:
    """The software and the GPU the figures come from; exits ``NO_CUDA`` without a CUDA device (unless allowed)."""
    import torch

    _emit('python', sys.version.split()[0])
    _emit('torch', torch.__version__)
    if not torch.cuda.is_available():
        _emit('cuda', 'not available')
        if not allow_cpu:
            _fail('no CUDA device is visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES='
                  f'{os.environ.get("CUDA_VISIBLE_DEVICES")!r}): run this on a GPU machine, or use --dry-run or '
                  '--cpu-smoke.', NO_CUDA)
        return
    _emit('cuda', f'{torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, {torch.cuda.device_count()} GPU(s)')
    props = torch.cuda.get_device_properties(0)
    _emit('gpu', f'{props.name}, compute capability {props.major}.{props.minor}, '
                 f'{props.total_memory / 2**30:.1f} GiB')
    _emit('native bf16', torch.cuda.is_bf16_supported(including_emulation=False))


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


def _log_points(log_file: str) -> list[tuple[int, float | None, dict]]:
    """(iteration, seconds per iteration, {term: value}) of every logged training line."""
    points = []
    with open(log_file, encoding='utf-8') as f:
        for line in f:
            match = LOG_LINE.search(line)
            if match:
                terms = {k: float(v) for k, v in LOSS.findall(match.group(3))}
                points.append((int(match.group(1).replace(',', '')), match.group(2) and float(match.group(2)), terms))
    return points


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


def training(exp_dir: str, falling_loss: bool, resumed_from: int | None) -> None:
    """Figures of one training run in ``exp_dir`` (its newest log); checks its latest weights are finite, and
    optionally that the pixel loss fell and that the run resumed from iteration ``resumed_from``."""
    logs = sorted(glob.glob(os.path.join(exp_dir, 'train_*.log')), key=os.path.getmtime)
    if not logs:
        _fail(f'{exp_dir}: no train_*.log (did the training start?)')
    with open(logs[-1], encoding='utf-8') as f:
        text = f.read()
    if resumed_from is not None and not re.search(rf'Resuming training from epoch: \d+, iter: {resumed_from}\.',
                                                  text):
        _fail(f'{logs[-1]}: the run did not resume from iteration {resumed_from}')
    points = _log_points(logs[-1])
    if not points:
        _fail(f'{logs[-1]}: no logged training iteration')
    _emit('iterations logged', f'{points[0][0]}..{points[-1][0]} ({len(points)} lines)')
    times = [t for _, t, _ in points[len(points) // 2:] if t is not None]
    if times:
        _emit('s/iter (median, second half)', f'{statistics.median(times):.4f}')
    pixel = [terms['l_pix'] for _, _, terms in points if 'l_pix' in terms]
    if pixel:
        share = max(len(pixel) // CURVE_SHARE, 1)
        first, last = statistics.mean(pixel[:share]), statistics.mean(pixel[-share:])
        _emit('l_pix first/last quarter', f'{first:.4e} -> {last:.4e}')
        if not all(math.isfinite(v) for v in pixel):
            _fail(f'{logs[-1]}: a logged l_pix is not finite')
        if falling_loss and not last < first:
            _fail(f'{logs[-1]}: l_pix did not fall ({first:.4e} -> {last:.4e})')
    elif falling_loss:
        _fail(f'{logs[-1]}: no l_pix logged')
    skipped = text.count('step skipped')
    _emit('skipped non-finite steps', skipped)
    checkpoint = os.path.join(exp_dir, 'models', 'net_g_latest.pth')
    if not os.path.isfile(checkpoint):
        _fail(f'{checkpoint} was not written')
    _emit('finite weight tensors (params + params_ema)', _finite_weights(checkpoint))
    metrics = os.path.join(exp_dir, 'metrics.json')
    if os.path.isfile(metrics):
        with open(metrics, encoding='utf-8') as f:
            rounds = json.load(f)
        last_round = list(rounds)[-1] if rounds else None
        if last_round is not None and isinstance(rounds[last_round], dict) and rounds[last_round].get('average'):
            average = ', '.join(f'{k} {v:.4f}' for k, v in rounds[last_round]['average'].items())
            _emit(f'validation average at {last_round}', average)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    env = commands.add_parser('environment')
    env.add_argument('--allow-cpu', action='store_true')
    over = commands.add_parser('overrides')
    over.add_argument('option_file')
    over.add_argument('entries', nargs='+')
    train = commands.add_parser('training')
    train.add_argument('exp_dir')
    train.add_argument('--falling-loss', action='store_true')
    train.add_argument('--resumed-from', type=int)
    args = parser.parse_args(argv)
    if args.command == 'environment':
        environment(args.allow_cpu)
    elif args.command == 'overrides':
        overrides(args.option_file, args.entries)
    else:
        training(args.exp_dir, args.falling_loss, args.resumed_from)


if __name__ == '__main__':
    main()
