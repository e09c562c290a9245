"""A model card for a shipped weights file, generated from its header and from benchmark reports.

    python -m datprl_arch.tools.model_card --weights release \\
        --report validation=results/release_val/report.json --report test=results/release_test/report.json \\
        --report unseen=results/release_unseen/report.json --checkpoint md_mini_release \\
        --analysis experiments/datprl_md_mini_release/prompt_analysis/10000 \\
        --training "python -m datprl_arch.train -opt options/release/md_mini_release.yml --threads 1" \\
        --notes docs/model_card_notes.md --out docs/model_card.md

The card states the file (sha256, size, network, parameters), its provenance (the header :mod:`.release` wrote:
source checkpoint, iteration, recipe, commit), how it was trained (``--training``: command, wall time, threads,
hardware, as given), per-set gains over the input on every report, the clean images' PSNR against the input per
domain, the prompt analysis (NMI of the pools' selections with the labels, the gates' prompt share), the targets
of the release (met or missed) and the sets it does not restore. ``--notes``: a Markdown file appended as is (what
the figures mean, the learning curve's reading).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from ..evaluation.aggregate import CLEAN_TASK
from ..utils.atomic import atomic_write_bytes
from ..utils.checkpoint import (METADATA_KEY, NETWORK_KEY, SAFETENSORS_PARAM_KEY, CheckpointError, file_sha256,
                                read_checkpoint)
from ..weights import resolve_checkpoint

PROG = 'python -m datprl_arch.tools.model_card'
#: The release targets (issue 24): every test set at least this far above its input, in dB ...
MIN_SET_GAIN = 0.3
#: ... the test mean at least this gain ...
MIN_MEAN_GAIN = 4.0
#: ... the unseen check's mean at least this gain, none of its sets below its input by more than this ...
MIN_UNSEEN_MEAN_GAIN, MAX_UNSEEN_LOSS = 1.0, 0.5
#: ... and clean images back at this PSNR against themselves, in every domain.
MIN_CLEAN_PSNR = 38.0


class CardError(ValueError):
    """An input the card cannot be made from; the message names it."""


def _rows(report_path: str, checkpoint: Optional[str]) -> list[dict]:
    try:
        with open(report_path, encoding='utf-8') as f:
            rows = json.load(f)['rows']
    except (OSError, ValueError, KeyError) as err:
        raise CardError(f'cannot read the rows of benchmark report {report_path} ({err})') from None
    labels = list(dict.fromkeys(r['checkpoint'] for r in rows))
    label = checkpoint if checkpoint is not None else (labels[0] if len(labels) == 1 else None)
    if label not in labels:
        raise CardError(f'{report_path}: choose the checkpoint with --checkpoint (it holds {labels})')
    return [r for r in rows if r['checkpoint'] == label]


def set_table(rows: list[dict]) -> list[str]:
    """Markdown rows: set, images, input PSNR, restored PSNR, gain (clean sets: PSNR against the input)."""
    lines = ['| set | images | input PSNR | restored PSNR | gain (dB) |', '|---|---|---|---|---|']
    for r in rows:
        if r['task'] == CLEAN_TASK:
            lines.append(f"| {r['set']} (clean) | {r['n_images']} | - | {r['psnr_out']:.2f} (vs the input) | - |")
        else:
            lines.append(f"| {r['set']} | {r['n_images']} | {r['psnr_in']:.2f} | {r['psnr_out']:.2f} | "
                         f"{r['gain_psnr']:+.2f} |")
    degraded = [r for r in rows if r['task'] != CLEAN_TASK]
    if degraded:
        lines.append(f'| mean of the {len(degraded)} degraded sets | {sum(r["n_images"] for r in degraded)} | '
                     f'{np.mean([r["psnr_in"] for r in degraded]):.2f} | '
                     f'{np.mean([r["psnr_out"] for r in degraded]):.2f} | '
                     f'**{np.mean([r["gain_psnr"] for r in degraded]):+.2f}** |')
    return lines


def clean_by_domain(rows: list[dict]) -> dict[str, float]:
    """Mean PSNR of the output against the clean input, per domain (clean sets only)."""
    by_domain: dict[str, list] = {}
    for r in rows:
        if r['task'] == CLEAN_TASK:
            by_domain.setdefault(r['domain'], []).append(r['psnr_out'])
    return {d: float(np.mean(v)) for d, v in by_domain.items()}


def targets(test: list[dict], unseen: Optional[list[dict]]) -> list[str]:
    """The release targets, each with its figure and whether it is met."""
    degraded = [r for r in test if r['task'] != CLEAN_TASK]
    worst = min(degraded, key=lambda r: r['gain_psnr'])
    lines = [f"- every test set at least {MIN_SET_GAIN:+.1f} dB above its input: "
             f"{_met(worst['gain_psnr'] >= MIN_SET_GAIN)} (worst {worst['set']} {worst['gain_psnr']:+.2f} dB)",
             f"- test mean gain at least {MIN_MEAN_GAIN:+.1f} dB: "
             f"{_met(np.mean([r['gain_psnr'] for r in degraded]) >= MIN_MEAN_GAIN)} "
             f"({np.mean([r['gain_psnr'] for r in degraded]):+.2f} dB)"]
    if unseen:
        seen = [r for r in unseen if r['task'] != CLEAN_TASK]
        mean, low = np.mean([r['gain_psnr'] for r in seen]), min(r['gain_psnr'] for r in seen)
        lines.append(f'- unseen check: mean gain at least {MIN_UNSEEN_MEAN_GAIN:+.1f} dB and no set more than '
                     f'{MAX_UNSEEN_LOSS} dB below its input: '
                     f'{_met(mean >= MIN_UNSEEN_MEAN_GAIN and low >= -MAX_UNSEEN_LOSS)} (mean {mean:+.2f}, '
                     f'worst {low:+.2f} dB)')
        clean = clean_by_domain(unseen)
        if clean:
            lines.append(f'- clean images at {MIN_CLEAN_PSNR:.0f} dB or better in every domain (unseen check): '
                         f'{_met(min(clean.values()) >= MIN_CLEAN_PSNR)} ('
                         + ', '.join(f'{d} {v:.1f} dB' for d, v in clean.items()) + ')')
    return lines


def _met(ok: bool) -> str:
    return '**met**' if ok else '**missed**'


def analysis_lines(folder: str) -> list[str]:
    """NMI of each pool's top-1 selection with the labels, and the prompt's share in each gated block."""
    try:
        with open(os.path.join(folder, 'nmi.json'), encoding='utf-8') as f:
            nmi = json.load(f)
        with open(os.path.join(folder, 'gates.json'), encoding='utf-8') as f:
            gates = json.load(f)
    except (OSError, ValueError) as err:
        raise CardError(f'cannot read the prompt analysis in {folder} ({err})') from None
    lines = [f'- {pool}: NMI with ' + ', '.join(f'{kind} {value:.2f}' for kind, value in kinds.items())
             for pool, kinds in nmi.items()]
    shares = [g['prompt'] / (g['feature'] + g['prompt']) for g in gates.values() if g['feature'] + g['prompt']]
    if shares:
        lines.append(f"- gated fusion: the prompt's share a_p / (a_f + a_p) is {min(shares):.2f}-{max(shares):.2f} "
                     f'over the {len(shares)} prompted blocks (0.5 at initialisation)')
    return lines


def header_lines(weights: str) -> list[str]:
    """The file, its network and the provenance its header records."""
    path = resolve_checkpoint(weights)
    checkpoint = read_checkpoint(path)
    meta, network = checkpoint.get(METADATA_KEY) or {}, checkpoint.get(NETWORK_KEY)
    if network is None:
        raise CardError(f'{path} carries no network options in its header: write it with tools.release')
    tensors = checkpoint[SAFETENSORS_PARAM_KEY]
    lines = [f'- file: `{os.path.relpath(path)}` ({os.path.getsize(path) / 2 ** 20:.2f} MiB, '
             f'{meta.get("dtype", "?")}), sha256 `{file_sha256(path)}`',
             f'- network: `{network["type"]}`, {sum(t.numel() for t in tensors.values()):,} stored values; options '
             f'`{json.dumps(network, sort_keys=True)}`']
    lines += [f'- {key.replace("_", " ")}: `{meta[key]}`' for key in
              ('recipe', 'iteration', 'param_key', 'commit', 'source_checkpoint', 'created', 'torch_version')
              if key in meta]
    return lines


def card(weights: str, reports: list[tuple[str, str]], checkpoint: Optional[str], analysis: Optional[str],
         training: Sequence[str], notes: Optional[str]) -> str:
    """The card's Markdown."""
    name = os.path.splitext(os.path.basename(resolve_checkpoint(weights)))[0]
    lines = [f'# Model card: {name}', '', '<!-- generated by python -m datprl_arch.tools.model_card -->', '',
             '## The file', '', *header_lines(weights), '']
    if training:
        lines += ['## Training', '', *[f'- {t}' for t in training], '']
    rows = {split: _rows(path, checkpoint) for split, path in reports}
    if 'test' in rows:
        lines += ['## Targets', '', *targets(rows['test'], rows.get('unseen')), '']
    for split, split_rows in rows.items():
        lines += [f'## {split}', '', *set_table(split_rows), '']
        clean = clean_by_domain(split_rows)
        if clean:
            lines += ['Clean images, PSNR of the output against the input: '
                      + ', '.join(f'{d} {v:.1f} dB' for d, v in clean.items()) + '.', '']
    failing = [r for split in ('test', 'unseen') for r in rows.get(split, [])
               if r['task'] != CLEAN_TASK and r['gain_psnr'] < MIN_SET_GAIN]
    if failing:
        lines += ['## What it does not restore', '',
                  *[f"- {r['set']}: {r['gain_psnr']:+.2f} dB over its input" for r in failing], '']
    if analysis:
        lines += ['## Prompt analysis (validation images)', '', *analysis_lines(analysis), '']
    if notes:
        with open(notes, encoding='utf-8') as f:
            lines += [f.read().rstrip(), '']
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('--weights', default='release', help="the weights file (default: 'release', the shipped one)")
    parser.add_argument('--report', action='append', default=[], metavar='SPLIT=REPORT_JSON',
                        help='a benchmark report.json and the name of its split (repeatable; test, unseen, ...)')
    parser.add_argument('--checkpoint', help='label of the checkpoint in reports holding several')
    parser.add_argument('--analysis', help='prompt analysis folder (nmi.json, gates.json)')
    parser.add_argument('--training', action='append', default=[], help='a line on how it was trained (repeatable)')
    parser.add_argument('--notes', help='Markdown appended to the card')
    parser.add_argument('--out', required=True, help='Markdown file to write')
    args = parser.parse_args(argv)
    reports = [tuple(r.split('=', 1)) for r in args.report]
    if any(len(r) != 2 for r in reports):
        parser.error('--report expects SPLIT=REPORT_JSON')
    try:
        text = card(args.weights, reports, args.checkpoint, args.analysis, args.training, args.notes)
    except (CardError, CheckpointError) as err:
        sys.exit(f'{PROG}: error: {err}')
    atomic_write_bytes(text.encode('utf-8'), args.out)
    sys.stdout.write(f'wrote {args.out}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
