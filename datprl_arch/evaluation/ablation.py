"""What the prompts buy: train several configurations for several seeds at the same budget, benchmark them all
against the input, and tabulate the mean and spread over seeds.

Each training run is BasicSR's own runner (``python -m datprl_arch.train``, one subprocess per run, named
``<config name>_seed<S>`` so an interrupted ablation resumes with ``--auto_resume`` and skips finished runs); the
benchmark is :func:`datprl_arch.evaluation.runner.run_benchmark` over every checkpoint at once. The table gives, per
set, domain and overall, the input PSNR and each configuration's mean restored PSNR and gain with the standard
deviation over seeds, plus parameter counts and the median training-step time read from the training logs.
"""
from __future__ import annotations

import glob
import os
import os.path as osp
import re
import statistics
import subprocess
import sys
from collections import OrderedDict
from typing import Optional, Sequence

from ..options import load_option_file
from ..utils.atomic import atomic_write_bytes, atomic_write_json
from .runner import BenchmarkError, run_benchmark

#: The training log's per-iteration time, ``time (data): 0.412 (0.010)``.
STEP_TIME = re.compile(r'time \(data\): ([\d.]+)')
LEVELS = ('set', 'domain', 'overall')


def run_name(config: str, seed: int) -> str:
    return f"{load_option_file(config)['name']}_seed{seed}"


def train(config: str, seed: int, root: str, extra: Sequence[str] = ()) -> str:
    """Train ``config`` with ``manual_seed: seed`` (resuming an interrupted run); returns its final checkpoint."""
    name = run_name(config, seed)
    checkpoint = osp.join(root, 'experiments', name, 'models', 'net_g_latest.pth')
    if osp.isfile(checkpoint):
        return checkpoint
    command = [sys.executable, '-m', 'datprl_arch.train', '-opt', config, '--auto_resume', '--force_yml',
               f'name={name}', f'manual_seed={seed}', *extra]
    done = subprocess.run(command, cwd=root)
    if done.returncode or not osp.isfile(checkpoint):
        raise BenchmarkError(f'training {config} (seed {seed}) failed (exit status {done.returncode}) without '
                             f'{checkpoint}; its log is in {osp.join(root, "experiments", name)}')
    return checkpoint


def step_time(root: str, name: str) -> Optional[float]:
    """Median seconds per training iteration logged by BasicSR for run ``name`` (its newest log)."""
    logs = sorted(glob.glob(osp.join(root, 'experiments', name, 'train_*.log')), key=osp.getmtime)
    if not logs:
        return None
    with open(logs[-1], encoding='utf-8') as f:
        times = [float(t) for t in STEP_TIME.findall(f.read())]
    return statistics.median(times) if times else None


def _spread(values: list) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(report: dict, runs: 'OrderedDict[str, list[tuple[int, str]]]') -> dict:
    """Mean and spread over seeds of each configuration, per set, per domain and overall, from a benchmark
    report whose checkpoints are the runs' (``runs``: configuration name -> [(seed, checkpoint path)])."""
    label_of = {osp.abspath(c['path']): c['label'] for c in report['checkpoints']}
    params = {c['label']: c['parameters'] for c in report['checkpoints']}
    stages = {c['label']: [st['trainable_params'] for st in c.get('training_stages') or ()]
              for c in report['checkpoints']}
    rows = []
    for level in LEVELS:
        records = report['rows'] if level == 'set' else [a for a in report['aggregates'][level]]
        keys = list(OrderedDict.fromkeys(r['set'] if level == 'set' else r['group'] for r in records))
        for key in keys:
            row = {'level': level, 'group': key, 'configs': OrderedDict()}
            for config, members in runs.items():
                labels = {label_of[osp.abspath(path)] for _, path in members}
                mine = [r for r in records if r['checkpoint'] in labels and
                        (r['set'] if level == 'set' else r['group']) == key]
                row['psnr_in'] = mine[0]['psnr_in'] if mine else row.get('psnr_in')
                out_mean, out_std = _spread([r['psnr_out'] for r in mine])
                gain_mean, gain_std = _spread([r['gain_psnr'] for r in mine])
                row['configs'][config] = {'psnr_out': out_mean, 'psnr_out_std': out_std, 'gain_psnr': gain_mean,
                                          'gain_psnr_std': gain_std, 'n_seeds': len(mine)}
            rows.append(row)
    configs = OrderedDict((config, {'parameters': params[label_of[osp.abspath(members[0][1])]],
                                    'trainable_per_stage': stages[label_of[osp.abspath(members[0][1])]],
                                    'seeds': [s for s, _ in members]}) for config, members in runs.items())
    return {'rows': rows, 'configs': configs}


def _cell(entry: dict) -> str:
    """``restored (gain ± sd)``; a clean set has no gain (its target is the input): ``restored ± sd``."""
    if entry['psnr_out'] is None:
        return '-'
    if entry['gain_psnr'] is None:
        return f"{entry['psnr_out']:.2f} ± {entry['psnr_out_std']:.2f}"
    return (f"{entry['psnr_out']:.2f} ({entry['gain_psnr']:+.2f} ± {entry['gain_psnr_std']:.2f})")


def markdown(summary: dict, step_times: dict) -> str:
    """The side-by-side table: restored PSNR (gain ± standard deviation over seeds) of each configuration."""
    configs = list(summary['configs'])
    lines = ['| level | set | input | ' + ' | '.join(configs) + ' |', '|---|---|---|' + '---|' * len(configs)]
    for row in summary['rows']:
        psnr_in = '-' if row['psnr_in'] is None else f"{row['psnr_in']:.2f}"
        lines.append(f"| {row['level']} | {row['group']} | {psnr_in} | "
                     + ' | '.join(_cell(row['configs'][c]) for c in configs) + ' |')
    lines.append('| parameters | | | ' + ' | '.join(f"{summary['configs'][c]['parameters']:,}" for c in configs)
                 + ' |')
    lines.append('| trainable per stage | | | ' + ' | '.join(
        ' / '.join(f'{n:,}' for n in summary['configs'][c].get('trainable_per_stage') or ()) or 'all'
        for c in configs) + ' |')
    lines.append('| s / training step | | | ' + ' | '.join(
        '-' if step_times.get(c) is None else f'{step_times[c]:.3f}' for c in configs) + ' |')
    seeds = summary['configs'][configs[0]]['seeds']
    return ('PSNR dB of the restored test images, mean over seeds ' + ', '.join(map(str, seeds))
            + ' (gain over the input ± its standard deviation over seeds; clean sets: PSNR against the input'
            + ' ± its standard deviation).\n\n' + '\n'.join(lines) + '\n')


def run_ablation(configs: Sequence[str], test_option: str, seeds: Sequence[int], name: str,
                 root: Optional[str] = None, train_overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """Train every configuration for every seed (skipping finished runs), benchmark them, write
    ``results/<name>/ablation.md`` and ``ablation.json``; returns the summary."""
    root = root or os.getcwd()
    runs: 'OrderedDict[str, list]' = OrderedDict()
    for config in configs:
        runs[load_option_file(config)['name']] = [(s, train(config, s, root, train_overrides)) for s in seeds]
    checkpoints = [path for members in runs.values() for _, path in members]
    report = run_benchmark(test_option, checkpoints, name=name, quiet=quiet, root=root)
    summary = summarize(report, runs)
    times = {}
    for config, members in runs.items():
        measured = [t for t in (step_time(root, f'{config}_seed{s}') for s, _ in members) if t is not None]
        times[config] = statistics.median(measured) if measured else None
    summary['step_time_s'] = times
    out = osp.join(root, 'results', name)
    text = markdown(summary, times)
    atomic_write_bytes(text.encode(), osp.join(out, 'ablation.md'))
    atomic_write_json(summary, osp.join(out, 'ablation.json'))
    summary['markdown'] = text
    return summary
