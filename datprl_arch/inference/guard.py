"""``datprl-restore --explain`` and ``--guard``: what the network took each image for, how much it changed it, and
a guard that keeps an image the network should leave alone.

With a detection head (:mod:`.detection`, fitted by ``tools.calibrate``) every image gets its detected domain and
task with their probabilities. The guard then, in this order:

1. keeps the input when the detected task is ``clean``;
2. keeps the input when the task's probability is below the head's ``min_confidence``;
3. blends the output towards the input, ``x + a (y - x)``, when it changed the image more than the network does on
   validation images of the detected task (PSNR of output vs input below that task's range): ``a`` brings the change
   to the range's edge (the PSNR of the blend against the input is the PSNR at ``a = 1`` minus ``20 log10 a``).

A change smaller than the range is reported, not acted on: it cannot make the image worse than its input.
``restore_report.csv`` and ``restore_report.json`` are written beside the outputs (:func:`write_report`).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from basicsr.utils import get_root_logger

from ..evaluation.aggregate import CLEAN_TASK
from ..utils.atomic import atomic_write_bytes, atomic_write_json
from .detection import DetectionError, DetectionHead, change_psnr, feature_kind, image_features, read_head

#: File names of the report, written into the output folder.
REPORT_CSV, REPORT_JSON = 'restore_report.csv', 'restore_report.json'
#: Columns of ``restore_report.csv`` (the JSON also has every class's probability).
REPORT_FIELDS = ('file', 'output', 'domain', 'domain_probability', 'task', 'task_probability', 'change_psnr_db',
                 'tiles', 'tile_side', 'seconds', 'guard', 'guard_reason', 'kept_fraction', 'output_change_psnr_db')
#: Values of the ``guard`` column.
GUARD_OFF, RESTORED, KEPT_INPUT, BLENDED = 'off', 'restored', 'kept_input', 'blended'
#: Decimals of the report's floats.
DIGITS = 4


@dataclass
class Explainer:
    """Explains (and with ``guard``, guards) each restored image; ``head`` None explains without detection."""

    head: Optional[DetectionHead]
    guard: bool = False

    def detect(self, restorer, image: torch.Tensor) -> dict:
        """``{'domain', 'domain_probability', 'task', 'task_probability', 'probabilities'}`` of ``image``
        ``[1, C, H, W]``; empty without a head."""
        if self.head is None:
            return {}
        probabilities = self.head.predict(image_features(restorer, image, self.head.kind))
        out = {'probabilities': {}}
        for kind, p in probabilities.items():
            classes = self.head.classes(kind)
            best = int(p[0].argmax())
            out[kind], out[f'{kind}_probability'] = classes[best], float(p[0, best])
            out['probabilities'][kind] = {c: float(v) for c, v in zip(classes, p[0].tolist())}
        return out

    def decide(self, detected: dict, change: float) -> tuple[str, str, float]:
        """``(guard, reason, kept fraction a of the network's change)`` for a detection and a change (dB)."""
        if not self.guard:
            return GUARD_OFF, '', 1.0
        task, confidence = detected['task'], detected['task_probability']
        if task == CLEAN_TASK:
            return KEPT_INPUT, f'judged clean (p={confidence:.2f})', 0.0
        if confidence < self.head.guard.min_confidence:
            return KEPT_INPUT, (f'unsure of the task: {task} p={confidence:.2f} < '
                                f'{self.head.guard.min_confidence:.2f}'), 0.0
        low, high = self.head.guard.change_db.get(task, (-math.inf, math.inf))
        if change < low:
            kept = 10 ** ((change - low) / 20)  # the blend's PSNR against the input is then exactly ``low``
            return BLENDED, f'changed more than on {task} validation images ({change:.1f} < {low:.1f} dB)', kept
        if change > high:
            return RESTORED, f'changed less than on {task} validation images ({change:.1f} > {high:.1f} dB)', 1.0
        return RESTORED, '', 1.0

    def __call__(self, restorer, image: torch.Tensor, output: torch.Tensor,
                 gray: bool = False) -> tuple[torch.Tensor, bool, dict]:
        """Input ``[1, C, H, W]`` and the network's output -> (the output to write, whether it is the input itself,
        the report fields of this image). ``gray``: the image is stored gray, its change is that of the luma."""
        detected = self.detect(restorer, image)
        change = change_psnr(output, image, gray)
        guard, reason, kept = self.decide(detected, change) if detected else (GUARD_OFF, 'no detection head', 1.0)
        if kept < 1:
            output = image + kept * (output.clamp(0, 1) - image)
        after = change_psnr(output, image, gray) if kept else math.inf
        record = {**detected, 'change_psnr_db': change, 'guard': guard, 'guard_reason': reason,
                  'kept_fraction': kept, 'output_change_psnr_db': after}
        return output, kept == 0, record


def _cell(value) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return 'inf' if math.isinf(value) else f'{value:.{DIGITS}f}'
    return str(value)


def report_folder(outputs: Sequence[str]) -> str:
    """The folder the report goes into: that of the outputs (the common folder of a folder INPUT's results)."""
    folders = {os.path.dirname(os.path.abspath(o)) for o in outputs}
    return os.path.commonpath(sorted(folders)) if folders else os.getcwd()


def write_report(records: Sequence[dict], folder: str, about: dict) -> tuple[str, str]:
    """Write ``restore_report.csv`` (:data:`REPORT_FIELDS`) and ``restore_report.json`` (``about``: checkpoint,
    head and guard settings; ``images``: every record) into ``folder``, atomically; returns their paths."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_FIELDS, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(record.get(k)) for k in REPORT_FIELDS})
    paths = os.path.join(folder, REPORT_CSV), os.path.join(folder, REPORT_JSON)
    atomic_write_bytes(buffer.getvalue().encode('utf-8'), paths[0])
    atomic_write_json({**about, 'columns': list(REPORT_FIELDS), 'images': list(records)}, paths[1])
    return paths


#: Side of the blank image that checks, before any image is restored, that a head fits the network's features.
PROBE_SIDE = 32


def load_explainer(restorer, ckpt: str, explain: bool, guard: bool) -> Optional[Explainer]:
    """The :class:`Explainer` for ``--explain`` / ``--guard`` (None for neither) with the head of ``ckpt``.

    ``--guard`` without a head is a ``DetectionError`` saying how to fit one; ``--explain`` without one explains
    without detection (change, tiles, time) and says so in a warning. A head that does not fit the network's
    features is refused before any image is restored."""
    if not explain and not guard:
        return None
    head = read_head(ckpt)
    fit = f'python -m datprl_arch.tools.calibrate --ckpt {ckpt} -opt VAL.yml, and restore with the checkpoint it writes'
    if head is None:
        if guard:
            raise DetectionError(f'--guard needs a detection head, and {ckpt} has none: fit one with {fit}')
        get_root_logger().warning(f'{ckpt} has no detection head: the report gives the change, tiles and time of each '
                                  f'image but no detected domain and task (fit a head with {fit})')
        return Explainer(None, False)
    if feature_kind(restorer.net) != head.kind:
        raise DetectionError(f'the detection head of {ckpt} reads {head.kind} features, the network offers '
                             f'{feature_kind(restorer.net)}: it was fitted for another network')
    head.standardise(image_features(restorer, torch.zeros(1, restorer.channels, PROBE_SIDE, PROBE_SIDE), head.kind))
    return Explainer(head, guard)


def write_restore_report(records: Sequence[dict], outputs: Sequence[str], ckpt: str, explainer: Explainer) -> tuple:
    """:func:`write_report` into the outputs' folder, with the checkpoint, the guard setting and the head's
    thresholds and provenance; the paths are logged."""
    head = explainer.head
    about = {'checkpoint': ckpt, 'detection_head': head is not None, 'guard': explainer.guard,
             'thresholds': head.guard.to_dict() if head else None, 'head_fit': head.fit if head else None}
    paths = write_report(records, report_folder(outputs), about)
    get_root_logger().info(f'Report of {len(records)} image(s): {paths[0]} (also {os.path.basename(paths[1])})')
    return paths
