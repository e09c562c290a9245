"""The benchmark's report files: ``report.md`` (the table, checkpoints with sha256, metric choice, notes),
``report.csv`` (one line per set and per aggregate, per checkpoint) and ``report.json`` (everything), all written
atomically; and the text table the command prints."""
from __future__ import annotations

import csv
import io
import os.path as osp
from typing import Optional, Sequence

from ..utils.atomic import atomic_write_bytes, atomic_write_json
from .aggregate import LEVELS, METRICS
from .detection import markdown_lines as detection_lines

#: Columns of ``report.csv``; the 95 % interval is split into its two ends.
CSV_FIELDS = ('level', 'set', 'dataset', 'domain', 'task', 'checkpoint', 'network', 'bit_depth', 'input_upsampled',
              'n_sets', 'n_images') + tuple(
    f for m in METRICS for f in (f'n_{m}', f'{m}_in', f'{m}_out', f'gain_{m}', f'{m}_in_std', f'{m}_std',
                                 f'gain_{m}_std', f'gain_{m}_ci95_low', f'gain_{m}_ci95_high'))
#: Levels of the printed table (the file has every level).
CONSOLE_LEVELS = ('set', 'domain', 'overall')
DIGITS = {'psnr': 2, 'ssim': 4}


def csv_records(report: dict) -> list[dict]:
    """The flat lines of ``report.csv``: every set row, then every aggregate (``set`` holds the group name)."""
    records = [dict(row, level='set') for row in report['rows']]
    records += [dict(agg, set=agg['group']) for level in LEVELS for agg in report['aggregates'][level]]
    for record in records:
        for m in METRICS:
            ci = record.pop(f'gain_{m}_ci95', None) or (None, None)
            record[f'gain_{m}_ci95_low'], record[f'gain_{m}_ci95_high'] = ci
    return records


def _csv_text(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for record in csv_records(report):
        writer.writerow({k: '' if record.get(k) is None else record.get(k) for k in CSV_FIELDS})
    return buffer.getvalue()


def _num(value: Optional[float], metric: str, sign: bool = False) -> str:
    if value is None:
        return 'n/a'
    return f'{value:+.{DIGITS[metric]}f}' if sign else f'{value:.{DIGITS[metric]}f}'


def _mean_std(row: dict, metric: str, side: str) -> str:
    std = row.get(f'{metric}_in_std' if side == 'in' else f'{metric}_std')
    text = _num(row.get(f'{metric}_{side}'), metric)
    return text if std is None else f'{text} ±{std:.{DIGITS[metric]}f}'


def _gain(row: dict, metric: str) -> str:
    text = _num(row.get(f'gain_{metric}'), metric, sign=True)
    ci = row.get(f'gain_{metric}_ci95')
    return text if not ci else f'{text} [{ci[0]:.{DIGITS[metric]}f}, {ci[1]:.{DIGITS[metric]}f}]'


def _groups(report: dict, level: str) -> list[tuple[str, str, str, dict]]:
    """``(title, domain, task, {checkpoint: row})`` per set or aggregate group of ``level``, in order."""
    source = report['rows'] if level == 'set' else report['aggregates'][level]
    groups: dict = {}
    for row in source:
        if level == 'set':
            key, domain, task, title = row['set'], row['domain'], row['task'], row['set']
        else:
            key, domain, task = row['group'], '', ''
            title = 'overall' if level == 'overall' else f'{level}: {row["group"]}'
            title += f' ({row["n_sets"]} sets)'
        groups.setdefault(key, (title, domain, task, {}))[3][row['checkpoint']] = row
    return list(groups.values())


def table_lines(report: dict, levels: Sequence[str] = ('set',) + LEVELS, spread: bool = True) -> list[str]:
    """The result table as aligned Markdown lines: one line per set / group, the input's mean, then per checkpoint
    the restored mean and the gain; with ``spread``, means carry ± their standard deviation over images and gains
    their 95 % interval."""
    mean_std = _mean_std if spread else (lambda row, metric, side: _num(row.get(f'{metric}_{side}'), metric))
    gain = _gain if spread else (lambda row, metric: _num(row.get(f'gain_{metric}'), metric, sign=True))
    labels = [c['label'] for c in report['checkpoints']]
    header = ['set', 'domain', 'task', 'images', 'input PSNR', 'input SSIM']
    for label in labels:
        header += [f'{label} PSNR', f'{label} gain', f'{label} SSIM', f'{label} SSIM gain']
    lines = [header]
    for level in levels:
        for title, domain, task, by_checkpoint in _groups(report, level):
            first = by_checkpoint[labels[0]]
            line = [title, domain, task, str(first['n_images']), mean_std(first, 'psnr', 'in'),
                    mean_std(first, 'ssim', 'in')]
            for label in labels:
                row = by_checkpoint.get(label, {})
                line += [mean_std(row, 'psnr', 'out'), gain(row, 'psnr'), mean_std(row, 'ssim', 'out'),
                         gain(row, 'ssim')]
            lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ['| ' + ' | '.join(cell.ljust(w) for cell, w in zip(line, widths)) + ' |' for line in lines]
    out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return out


def console_table(report: dict) -> str:
    """What the command prints: the table of sets, per domain and overall (means and gains; the spread is in the
    files), the metric choice and the notes."""
    lines = [f"Benchmark {report['name']}: {report['metric_note']}",
             *table_lines(report, CONSOLE_LEVELS, spread=False)]
    lines += [f'Note: {note}' for note in report['notes']]
    return '\n'.join(lines)


TASK_PROMPTS_NOTE = "; every set restored under its task's own prompt (--task-prompts)"


def stage_text(stage: dict) -> str:
    """One entry of a checkpoint's ``training_stages``, e.g. ``stage 2 (iters 501-1000, tasks derain, dehaze;
    frozen backbone): 12,345 trainable``."""
    tasks = ', '.join(stage.get('tasks') or ()) or 'all'
    frozen = f"; frozen {', '.join(stage['freeze'])}" if stage.get('freeze') else ''
    return (f"stage {stage['stage']} (iters {stage['first_iter']}-{stage['until_iter']}, tasks {tasks}{frozen}): "
            f"{stage['trainable_params']:,} trainable")


def markdown(report: dict) -> str:
    """``report.md``: provenance (option file, versions, date, metrics, checkpoints), the table and the notes."""
    versions = ', '.join(f'{k} {v}' for k, v in report['versions'].items())
    metrics = '; '.join(f"{m}: {o['type']}, crop_border {o.get('crop_border', 0)}, "
                        f"{'Y channel' if o.get('test_y_channel') else 'RGB'} ({o['from']})"
                        for m, o in report['metrics'].items())
    lines = [f"# Benchmark {report['name']}", '',
             f"- option file: `{report['option_file']}` (model {report['model_type']}, device {report['device']}, "
             f"autocast {report.get('amp', 'none')}){TASK_PROMPTS_NOTE if report.get('task_prompts') else ''}",
             f"- date: {report['date']}", f'- versions: {versions}',
             f"- metric bits: {report['metric_bits']}. {report['metric_note']}", f'- metrics: {metrics}',
             f"- weights: entry `{report['param_key']}` of each checkpoint (else params_ema, then params)",
             '- statistics: mean ± standard deviation over images; gain = restored - input per image, mean with '
             "its 95 % Student-t interval; task, domain and overall rows average the sets' means.", '',
             '## Checkpoints', '', '| label | network | network_g from | parameters | path | sha256 |',
             '|---|---|---|---|---|---|']
    lines += [f"| {c['label']} | {c['network']} | {c['network_from']} | {c['parameters']:,} | `{c['path']}` | "
              f"`{c['sha256']}` |" for c in report['checkpoints']]
    staged = [c for c in report['checkpoints'] if c.get('training_stages')]
    if staged:
        lines += ['', 'Training stages (trainable parameters of each):', '']
        lines += [f"- {c['label']}: " + '; '.join(stage_text(s) for s in c['training_stages']) for c in staged]
    lines += ['', '## Results', '', *table_lines(report), '']
    if report['notes']:
        lines += ['## Notes', '', *[f'- {note}' for note in report['notes']], '']
    lines += detection_lines(report.get('detection'))
    lines += ['## Samples', '', 'Per set, the image of largest PSNR gain (first checkpoint), cropped where the '
              'restoration removed most error: input | restored | ground truth.', '', '![samples](samples.png)', '']
    return '\n'.join(lines)


def write_reports(report: dict, out_dir: str) -> dict:
    """Write ``report.md``, ``report.csv`` and ``report.json`` into ``out_dir``, atomically; returns their paths."""
    paths = {'report_md': osp.join(out_dir, 'report.md'), 'report_csv': osp.join(out_dir, 'report.csv'),
             'report_json': osp.join(out_dir, 'report.json')}
    atomic_write_bytes(markdown(report).encode('utf-8'), paths['report_md'])
    atomic_write_bytes(_csv_text(report).encode('utf-8'), paths['report_csv'])
    atomic_write_json(report, paths['report_json'])
    return paths
