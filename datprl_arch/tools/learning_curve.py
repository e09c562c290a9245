"""What longer training buys: validation gain over the input against iterations, from training runs' own logs.

    python -m datprl_arch.tools.learning_curve \\
        experiments/datprl_md_mini_release/metrics.json=DATPRL \\
        experiments/datprl_md_mini_release_baseline/metrics.json=backbone \\
        --inputs results/md_mini_val_inputs/report.json --out docs/img/learning_curve.png

Each run's ``metrics.json`` (written by every validation round, :mod:`datprl_arch.models.reporting`) holds the
restored PSNR of each validation set; the input PSNR of each set comes from a benchmark report of the same
validation option file (``report.json``, any checkpoint: the input does not depend on it). Degraded sets give the
gain (restored minus input), averaged per domain and over all; clean sets (task ``clean``) give the PSNR of the
output against the clean input, worst domain shown. Writes the figure (log iteration axis, one panel per quantity,
one line per run) and prints the same figures as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from ..evaluation.aggregate import CLEAN_TASK
from ..utils.atomic import atomic_write_file

PROG = 'python -m datprl_arch.tools.learning_curve'
OVERALL = 'all'
#: Panels of the figure, in order: the overall gain, each domain's gain, the worst clean set.
CLEAN_PANEL = 'clean (worst domain, PSNR vs input)'
FIGURE_DPI = 120
PANEL_SIZE = (3.6, 2.8)  # inches per panel


class CurveError(ValueError):
    """A run or report that cannot be read as a learning curve; the message names the file."""


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f, object_pairs_hook=OrderedDict)
    except (OSError, ValueError) as err:
        raise CurveError(f'cannot read {path} ({err})') from None


def input_psnr(report_path: str) -> dict[str, float]:
    """Mean input PSNR per set name of a benchmark ``report.json`` (degraded sets only)."""
    rows = _read_json(report_path).get('rows') or []
    found = {row['set']: row['psnr_in'] for row in rows if row.get('task') != CLEAN_TASK and row.get('psnr_in')}
    if not found:
        raise CurveError(f'{report_path} holds no degraded set with an input PSNR (rows[].psnr_in)')
    return found


def curve(metrics_path: str, inputs: dict[str, float]) -> OrderedDict:
    """Per validation round (iteration, ascending): ``{panel: value}`` with the mean gain over all degraded sets,
    per domain, and the worst clean domain's PSNR against the input."""
    rounds = _read_json(metrics_path)
    points = OrderedDict()
    for iteration in sorted(rounds, key=lambda k: int(k) if str(k).isdigit() else -1):
        if not str(iteration).isdigit():
            continue
        gains, clean = {}, {}
        for name, record in rounds[iteration]['sets'].items():
            if record.get('psnr') is None:
                continue
            if record.get('task') == CLEAN_TASK:
                clean.setdefault(record['domain'], []).append(record['psnr'])
            elif name in inputs:
                gains.setdefault(record['domain'], []).append(record['psnr'] - inputs[name])
        if not gains:
            raise CurveError(f'{metrics_path}, iteration {iteration}: none of its sets is in the input report '
                             f'(sets {list(rounds[iteration]["sets"])[:4]}..., report sets {list(inputs)[:4]}...)')
        point = OrderedDict([(OVERALL, float(np.mean([g for v in gains.values() for g in v])))])
        point.update((domain, float(np.mean(v))) for domain, v in gains.items())
        if clean:
            point[CLEAN_PANEL] = min(float(np.mean(v)) for v in clean.values())
        points[int(iteration)] = point
    return points


def plot(curves: 'OrderedDict[str, OrderedDict]', out: str) -> None:
    """One panel per quantity, one line per run, iterations on a log axis."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    panels = list(OrderedDict.fromkeys(k for c in curves.values() for p in c.values() for k in p))
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, points in curves.items():
            its = [i for i, p in points.items() if panel in p]
            ax.plot(its, [points[i][panel] for i in its], marker='o', markersize=3, label=label)
        ax.set_xscale('log')
        ax.set_xlabel('iteration')
        ax.set_title(panel if panel == CLEAN_PANEL else f'gain, {panel} (dB)', fontsize=9)
        if panel != CLEAN_PANEL:
            ax.axhline(0.0, color='grey', linewidth=0.8)
        ax.grid(True, which='both', alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_file(out, lambda tmp: fig.savefig(tmp, dpi=FIGURE_DPI, format=os.path.splitext(out)[1][1:]))
    plt.close(fig)


def markdown(curves: 'OrderedDict[str, OrderedDict]') -> str:
    """The curves as a Markdown table: run, iteration, then each panel."""
    panels = list(OrderedDict.fromkeys(k for c in curves.values() for p in c.values() for k in p))
    lines = ['| run | iteration | ' + ' | '.join(panels) + ' |', '|---|---|' + '---|' * len(panels)]
    for label, points in curves.items():
        for iteration, point in points.items():
            cells = [f'{point[p]:+.2f}' if p != CLEAN_PANEL and p in point else
                     (f'{point[p]:.1f} dB' if p in point else '-') for p in panels]
            lines.append(f'| {label} | {iteration} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def parse_run(text: str) -> tuple[str, str]:
    """``PATH[=LABEL]``: the label defaults to the run folder's name."""
    path, _, label = text.partition('=')
    return path, label or os.path.basename(os.path.dirname(os.path.abspath(path)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', metavar='METRICS_JSON[=LABEL]', help="runs' experiments/<name>/metrics.json")
    parser.add_argument('--inputs', required=True, help='report.json of a benchmark on the validation option file')
    parser.add_argument('--out', required=True, help='figure to write (.png, .svg, .pdf)')
    args = parser.parse_args(argv)
    try:
        inputs = input_psnr(args.inputs)
        curves = OrderedDict((label, curve(path, inputs)) for path, label in map(parse_run, args.runs))
        plot(curves, args.out)
    except CurveError as err:
        sys.exit(f'{PROG}: error: {err}')
    sys.stdout.write(markdown(curves) + f'\n\nFigure: {args.out}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
