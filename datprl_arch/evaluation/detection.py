"""How well a detection head (:mod:`datprl_arch.inference.detection`) detects domain and task: accuracy per set,
confusion matrices (``confusion.png``) and the expected calibration error, for the benchmark's report and the
calibration tool's figures."""
from __future__ import annotations

import os.path as osp
from typing import Optional, Sequence

import numpy as np

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 10
#: Inches per class of a confusion-matrix panel (and the smallest panel side).
CONFUSION_INCH_PER_CLASS, CONFUSION_MIN_INCHES = 0.55, 3.5


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of probabilities ``[N, K]`` against label indices ``[N]`` (-1: a class the head does not know, always
    wrong): ``sum_b n_b / N * |accuracy_b - mean confidence_b|`` over equal-width bins of the top probability."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if not len(labels):
        return float('nan')
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / len(labels))


def confusion_matrix(true: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> tuple[list, list]:
    """Counts ``[len(rows), len(classes)]``: rows are the true labels (the head's classes, then any others seen),
    columns the predicted classes. Returns ``(row labels, counts)``."""
    rows = list(classes) + sorted(set(true) - set(classes))
    counts = np.zeros((len(rows), len(classes)), dtype=int)
    for t, p in zip(true, predicted):
        counts[rows.index(t), list(classes).index(p)] += 1
    return rows, counts.tolist()


class DetectionTally:
    """Detections of one checkpoint's head over labelled images, grouped by set."""

    def __init__(self, classes: dict):
        self.classes = {kind: list(names) for kind, names in classes.items() if names}
        self.records: list = []  # (set, {kind: true label}, {kind: probabilities [K]})

    def add(self, set_name: str, labels: dict, probabilities: dict) -> None:
        """One image: its set, true ``{kind: label}`` and ``{kind: probabilities [K]}`` (numpy or lists)."""
        self.records.append((set_name, labels, {k: np.asarray(v, dtype=np.float64) for k, v in probabilities.items()}))

    def _kind(self, kind: str, records: list) -> dict:
        classes = self.classes[kind]
        probs = np.stack([r[2][kind] for r in records])
        true = [r[1][kind] for r in records]
        index = np.array([classes.index(t) if t in classes else -1 for t in true])
        predicted = [classes[i] for i in probs.argmax(axis=1)]
        return {'images': len(records), 'accuracy': float(np.mean(probs.argmax(axis=1) == index)),
                'ece': expected_calibration_error(probs, index),
                'mean_confidence': float(probs.max(axis=1).mean()), 'true': true, 'predicted': predicted}

    def summary(self) -> dict:
        """``{'classes', 'sets': {set: {kind: {images, accuracy, ece, mean_confidence}}}, 'overall': {kind: {...,
        'confusion': {'rows', 'columns', 'counts'}}}, 'unknown': {kind: labels the head does not know}}``."""
        out = {'classes': self.classes, 'sets': {}, 'overall': {}, 'unknown': {}}
        for set_name in dict.fromkeys(r[0] for r in self.records):
            records = [r for r in self.records if r[0] == set_name]
            out['sets'][set_name] = {k: _brief(self._kind(k, records)) for k in self.classes}
        for kind in self.classes:
            if not self.records:
                continue
            whole = self._kind(kind, self.records)
            rows, counts = confusion_matrix(whole['true'], whole['predicted'], self.classes[kind])
            out['overall'][kind] = {**_brief(whole), 'confusion': {'rows': rows, 'columns': self.classes[kind],
                                                                   'counts': counts}}
            out['unknown'][kind] = sorted(set(whole['true']) - set(self.classes[kind]))
        return out


def _brief(figures: dict) -> dict:
    return {k: figures[k] for k in ('images', 'accuracy', 'ece', 'mean_confidence')}


def write_confusion(detections: dict, path: str) -> Optional[str]:
    """``confusion.png``: per checkpoint (a row) the domain and task confusion matrices over all images, counts in
    the cells; None when matplotlib is missing or there is nothing to draw."""
    panels = [(label, kind, summary['overall'][kind]) for label, summary in detections.items()
              for kind in summary['overall']]
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use('Agg')
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    columns = max(sum(1 for p in panels if p[0] == label) for label in detections)
    side = max(CONFUSION_MIN_INCHES, CONFUSION_INCH_PER_CLASS * max(len(p[2]['confusion']['rows']) for p in panels))
    fig, axes = plt.subplots(len(detections), columns, figsize=(side * columns, side * len(detections)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, label in enumerate(detections):
        for col, (_, kind, figures) in enumerate(p for p in panels if p[0] == label):
            _draw(axes[row][col], figures, f'{label}: {kind}\naccuracy {figures["accuracy"]:.0%}, '
                                           f'ECE {figures["ece"]:.3f}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw(ax, figures: dict, title: str) -> None:
    matrix = figures['confusion']
    counts = np.array(matrix['counts'])
    ax.set_axis_on()
    ax.imshow(counts, cmap='Blues')
    ax.set_xticks(range(len(matrix['columns'])), matrix['columns'], rotation=60, ha='right', fontsize='small')
    ax.set_yticks(range(len(matrix['rows'])), matrix['rows'], fontsize='small')
    ax.set(xlabel='detected', ylabel='true')
    ax.set_title(title, fontsize='small')
    top = counts.max() if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        if value:
            ax.text(j, i, str(value), ha='center', va='center', fontsize='x-small',
                    color='white' if value > top / 2 else 'black')


def markdown_lines(detections: dict) -> list[str]:
    """The ``## Detection`` section of ``report.md``: per checkpoint with a head, accuracy and ECE per set and
    overall, and the confusion picture."""
    if not detections:
        return []
    lines = ['## Detection', '', 'Domain and task detected by the checkpoint\'s calibrated head (tools.calibrate): '
             'accuracy and expected calibration error (ECE, '
             f'{ECE_BINS} bins of the top probability).', '']
    for label, summary in detections.items():
        kinds = list(summary['classes'])
        lines += [f'### {label}', '', '| set | images | ' + ' | '.join(f'{k} accuracy | {k} ECE' for k in kinds) + ' |',
                  '|---|---|' + '---|---|' * len(kinds)]
        rows = list(summary['sets'].items()) + [('overall', summary['overall'])]
        for name, figures in rows:
            cells = [f'{figures[k]["accuracy"]:.1%} | {figures[k]["ece"]:.3f}' for k in kinds if k in figures]
            images = next(iter(figures.values()))['images'] if figures else 0
            lines.append(f'| {name} | {images} | ' + ' | '.join(cells) + ' |')
        unknown = {k: v for k, v in summary.get('unknown', {}).items() if v}
        if unknown:
            lines += ['', 'Labels the head was not fitted on (counted as wrong): '
                      + '; '.join(f'{k}: {", ".join(v)}' for k, v in unknown.items()) + '.']
        lines.append('')
    lines += ['![confusion](confusion.png)', '']
    return lines


def confusion_path(results_dir: str) -> str:
    return osp.join(results_dir, 'confusion.png')
