"""Fitting a checkpoint's detection head and guard thresholds on its validation split (the library behind
``python -m datprl_arch.tools.calibrate``), and measuring a head on other labelled sets.

Every validation image is restored once as ``datprl-restore`` would (:class:`~.restore.Restorer`): its features come
from the prompt of the whole image (:func:`~.detection.image_features`) and its change is the PSNR of the output
against the input. Per label kind (domain, task) a multinomial logistic regression with an L2 penalty is fitted on
the standardised features (torch L-BFGS, float64, deterministic). The penalty is chosen from
:data:`REGULARIZATION_GRID` by the out-of-fold negative log-likelihood of a :data:`CV_FOLDS`-fold split (each set's
images dealt to the folds in turn); a temperature fitted on those out-of-fold logits calibrates the final fit on all
images. The label modes' classifiers get only the temperature.

Guard thresholds (:class:`~.detection.GuardThresholds`): the task confidence that :data:`GUARD_CONFIDENCE_QUANTILE`
of the validation images fall below (out of fold), at most :data:`UNSURE_CEILING` (a head that is always sure on
validation images would otherwise refuse every image a little less sure); and per task the range of changes the
network makes on its validation images, widened by :data:`CHANGE_MARGIN_DB`.
"""
from __future__ import annotations

import copy
import datetime
import os.path as osp
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

from basicsr.data import build_dataset
from basicsr.utils import get_root_logger

from ..data.sources import DataSourceError
from ..evaluation.aggregate import CLEAN_TASK
from ..evaluation.detection import DetectionTally
from ..options import load_option_file
from ..utils.checkpoint import PARAM_KEYS, network_options, read_checkpoint
from .detection import (CLASSIFIER, LABEL_KINDS, MIN_FEATURE_STD, DetectionError, DetectionHead, GuardThresholds,
                        LinearHead, change_psnr, feature_kind, image_features, read_head, save_with_head)

#: Folds of the cross-validation that chooses the penalty and fits the temperature.
CV_FOLDS = 5
#: L2 penalties tried (on the mean cross-entropy; features are standardised).
REGULARIZATION_GRID = (1e-3, 1e-2, 1e-1, 1.0)
#: L-BFGS iterations of one logistic fit (full batch; converges well within them on a few hundred images).
LBFGS_ITERATIONS = 200
#: Range of the inverse temperature searched, and the golden-section steps of the search.
INVERSE_TEMPERATURE_RANGE = (0.05, 20.0)
GOLDEN_STEPS = 60
#: Share of validation images whose (out-of-fold) task confidence lies below the guard's confidence threshold.
GUARD_CONFIDENCE_QUANTILE = 0.05
#: Largest confidence threshold: an image whose task is more likely right than wrong is never refused as unsure.
UNSURE_CEILING = 0.5
#: Margin (dB) around the changes the network makes on a task's validation images, before the guard steps in.
CHANGE_MARGIN_DB = 1.0


@dataclass
class LabelledImage:
    """One validation (or test) image: its set, name, labels, features ``[F]`` and change (dB; None unmeasured)."""

    set_name: str
    image: str
    labels: dict  # kind -> label
    features: torch.Tensor
    change_db: Optional[float] = None


# ------------------------------------------------------------------------------------------------ data
def labelled_sets(option_file: str) -> list:
    """``(set name, dataset, default labels)`` for every non-training entry of ``option_file``'s ``datasets``."""
    opt = load_option_file(option_file)
    datasets = opt.get('datasets')
    if not isinstance(datasets, dict) or not datasets:
        raise DetectionError(f'{option_file}: no datasets (expected datasets: {{val_x: {{...}}, ...}})')
    sets = []
    for key, dataset_opt in datasets.items():
        if not isinstance(dataset_opt, dict) or key.split('_')[0] == 'train':
            continue
        dataset_opt = copy.deepcopy(dataset_opt)
        dataset_opt.update(phase=key.split('_')[0], scale=opt.get('scale', 1))
        try:
            dataset = build_dataset(dataset_opt)
        except (DataSourceError, KeyError, OSError, ValueError) as err:
            raise DetectionError(f'{option_file}: datasets.{key} cannot be read: {err}') from err
        defaults = {'domain': dataset_opt.get('domain'), 'task': dataset_opt.get('task')}
        sets.append((dataset_opt.get('name', key), dataset, defaults))
    if not sets:
        raise DetectionError(f'{option_file}: no validation or test sets (datasets entries other than train)')
    return sets


def _labels(item: dict, defaults: dict, where: str) -> dict:
    labels = {k: item.get(f'{k}_name', defaults[k]) for k in LABEL_KINDS}
    missing = [k for k, v in labels.items() if v is None]
    if missing:
        raise DetectionError(f'{where}: images have no {missing[0]} label (use DATPRLMultiDomainDataset sources '
                             f'with domain and task, or give the dataset entry a {missing[0]})')
    return labels


def collect(restorer, option_file: str, restore: bool = True) -> list:
    """Every image of ``option_file``'s sets as a :class:`LabelledImage`; with ``restore`` also its change."""
    kind = feature_kind(restorer.net)
    images = []
    for set_name, dataset, defaults in labelled_sets(option_file):
        for index in range(len(dataset)):
            item = dataset[index]
            x = item['lq'][None].float()
            if x.shape[1] != restorer.channels:
                x = x.expand(-1, restorer.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
            labels = _labels(item, defaults, f'{option_file}, set {set_name}')
            features = image_features(restorer, x, kind)[0]
            change = change_psnr(restorer(x)[0], x, gray=item.get('channels') == 1) if restore else None
            images.append(LabelledImage(set_name, osp.basename(str(item.get('lq_path', index))), labels, features,
                                        change))
    return images


# ------------------------------------------------------------------------------------------------ fitting
def fit_logistic(z: torch.Tensor, y: torch.Tensor, classes: int, penalty: float) -> tuple[torch.Tensor, ...]:
    """Multinomial logistic regression: features ``[N, F]``, labels ``[N]`` -> weight ``[K, F]``, bias ``[K]``
    (float64) minimising the mean cross-entropy plus ``penalty / 2 * |W|^2``."""
    weight = torch.zeros(classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=LBFGS_ITERATIONS, line_search_fn='strong_wolfe',
                                  tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + penalty / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def fold_indices(groups: list, folds: int = CV_FOLDS) -> np.ndarray:
    """Fold of each image: the images of each group (set) are dealt to the folds in turn, so every fold holds
    about the same share of every set."""
    seen: dict = {}
    out = np.empty(len(groups), dtype=int)
    for i, group in enumerate(groups):
        out[i] = seen.get(group, 0) % folds
        seen[group] = seen.get(group, 0) + 1
    return out


def out_of_fold_logits(z: torch.Tensor, y: torch.Tensor, classes: int, penalty: float,
                       folds: np.ndarray) -> torch.Tensor:
    """Logits ``[N, K]`` of every image from the fit on the other folds."""
    logits = torch.zeros(len(y), classes, dtype=torch.float64)
    for fold in np.unique(folds):
        held = torch.from_numpy(folds == fold)
        weight, bias = fit_logistic(z[~held], y[~held], classes, penalty)
        logits[held] = z[held] @ weight.T + bias
    return logits


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``logits / T`` (golden-section search on ``1/T``, in
    which it is convex)."""
    def loss(beta: float) -> float:
        return float(F.cross_entropy(logits * beta, y))

    low, high = INVERSE_TEMPERATURE_RANGE
    ratio = (5 ** 0.5 - 1) / 2
    for _ in range(GOLDEN_STEPS):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) <= loss(b) else (a, high)
    return 1.0 / ((low + high) / 2)


def fit_linear_head(z: torch.Tensor, names: list, folds: np.ndarray) -> tuple[LinearHead, torch.Tensor, dict]:
    """A calibrated :class:`LinearHead` for the labels ``names`` ``[N]`` of standardised features ``z`` ``[N, F]``;
    also the out-of-fold probabilities ``[N, K]`` and the choice made (penalty, temperature)."""
    classes = list(dict.fromkeys(names))
    y = torch.tensor([classes.index(n) for n in names])
    if len(classes) == 1:
        head = LinearHead(classes, torch.zeros(1, z.shape[1], dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64))
        return head, torch.ones(len(names), 1, dtype=torch.float64), {'penalty': None, 'temperature': 1.0}
    scores = {}
    for penalty in REGULARIZATION_GRID:
        logits = out_of_fold_logits(z, y, len(classes), penalty, folds)
        scores[penalty] = (float(F.cross_entropy(logits, y)), logits)
    penalty = min(scores, key=lambda p: scores[p][0])
    temperature = fit_temperature(scores[penalty][1], y)
    weight, bias = fit_logistic(z, y, len(classes), penalty)
    oof = (scores[penalty][1] / temperature).softmax(dim=-1)
    return LinearHead(classes, weight, bias, temperature), oof, {'penalty': penalty, 'temperature': temperature}


def fit_classifier_head(logits: torch.Tensor, names: list, classes: list) -> tuple[LinearHead, torch.Tensor, dict]:
    """A label mode's task classifier: only a temperature, fitted on the images whose task it knows."""
    known = [i for i, n in enumerate(names) if n in classes]
    if not known:
        raise DetectionError(f'none of the validation tasks {sorted(set(names))} is one of the classifier\'s '
                             f'tasks {classes}')
    y = torch.tensor([classes.index(names[i]) for i in known])
    temperature = fit_temperature(logits[known].double(), y)
    head = LinearHead(list(classes), None, None, temperature)
    return head, head.probabilities(logits), {'penalty': None, 'temperature': temperature}


def fit_guard(images: list, task_head: LinearHead, task_probabilities: torch.Tensor) -> GuardThresholds:
    """Guard thresholds from the validation images (see the module docstring); tasks without a finite change
    measured get no change range (the change check then does nothing for them)."""
    confidence = task_probabilities.max(dim=1).values
    minimum = min(float(torch.quantile(confidence, GUARD_CONFIDENCE_QUANTILE)), UNSURE_CEILING)
    ranges = {}
    for task in task_head.classes:
        changes = [im.change_db for im in images if im.labels['task'] == task and im.change_db is not None
                   and np.isfinite(im.change_db)]
        if changes:
            ranges[task] = [min(changes) - CHANGE_MARGIN_DB, max(changes) + CHANGE_MARGIN_DB]
    return GuardThresholds(minimum, ranges)


def _standardisation(features: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == CLASSIFIER:  # logits are used as they are
        return torch.zeros(features.shape[1], dtype=torch.float64), torch.ones(features.shape[1], dtype=torch.float64)
    return features.mean(0), features.std(0, unbiased=False).clamp_min(MIN_FEATURE_STD)


def fit_head(images: list, kind: str, classifier_classes: Optional[list] = None) -> tuple[DetectionHead, dict]:
    """The detection head of ``images`` (:func:`collect`) for features of ``kind``; also the out-of-fold figures
    on them (:meth:`~datprl_arch.evaluation.detection.DetectionTally.summary`)."""
    if len(images) < 2:
        raise DetectionError(f'{len(images)} labelled image(s): a head needs at least two')
    features = torch.stack([im.features for im in images]).double()
    mean, std = _standardisation(features, kind)
    z = (features - mean) / std
    folds = fold_indices([im.set_name for im in images])
    heads, oof, choices = {}, {}, {}
    for label in LABEL_KINDS:
        names = [im.labels[label] for im in images]
        if kind != CLASSIFIER:
            heads[label], oof[label], choices[label] = fit_linear_head(z, names, folds)
        elif label == 'task':
            heads[label], oof[label], choices[label] = fit_classifier_head(z, names, list(classifier_classes))
        else:
            heads[label] = None
    if CLEAN_TASK not in heads['task'].classes:
        get_root_logger().warning(f'no {CLEAN_TASK!r} images among the tasks {heads["task"].classes}: the head '
                                  'cannot tell a clean image, and the guard cannot leave one alone')
    tally = DetectionTally({k: h.classes for k, h in heads.items() if h is not None})
    for i, im in enumerate(images):
        tally.add(im.set_name, im.labels, {k: oof[k][i].numpy() for k in oof})
    head = DetectionHead(kind, mean, std, heads, fit_guard(images, heads['task'], oof['task']),
                         {'choices': choices, 'images': len(images)})
    return head, tally.summary()


# ------------------------------------------------------------------------------------------------ measuring
def measure_head(restorer, head: DetectionHead, option_file: str) -> dict:
    """Detection accuracy and calibration of ``head`` on the sets of ``option_file`` (prompts only, nothing is
    restored): :meth:`~datprl_arch.evaluation.detection.DetectionTally.summary`."""
    images = collect(restorer, option_file, restore=False)
    tally = DetectionTally({k: head.classes(k) for k in LABEL_KINDS})
    if images:
        probabilities = head.predict(torch.stack([im.features for im in images]))
        for i, im in enumerate(images):
            tally.add(im.set_name, im.labels, {k: p[i].numpy() for k, p in probabilities.items()})
    return tally.summary()


def summary_line(summary: dict) -> str:
    """``domain 97.2 % (ECE 0.031), task 88.0 % (ECE 0.052)`` of a tally summary's overall figures."""
    return ', '.join(f'{k} {f["accuracy"]:.1%} (ECE {f["ece"]:.3f}, {f["images"]} images)'
                     for k, f in summary['overall'].items())


def fitted_on(option_file: str, weights: Optional[str], restorer) -> dict:
    """Provenance of a fit: option file, weights entry, device, date."""
    return {'option_file': osp.abspath(option_file), 'weights': weights, 'device': str(restorer.device),
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'cv_folds': CV_FOLDS, 'confidence_quantile': GUARD_CONFIDENCE_QUANTILE,
            'change_margin_db': CHANGE_MARGIN_DB}


def calibrate(ckpt: str, option_file: str, out: str, param_key: Optional[str] = None, device: Optional[str] = None,
              tests: tuple = ()) -> dict:
    """Fit the head of checkpoint ``ckpt`` on the sets of ``option_file`` and write a copy of ``ckpt`` with it to
    ``out`` (:func:`~.detection.save_with_head`); measure it on the sets of each option file in ``tests``.

    Returns ``{'out', 'head', 'validation': out-of-fold summary, 'tests': {option file: summary}}``."""
    from .restore import load_restorer, network_config

    checkpoint = read_checkpoint(ckpt)
    carried = network_options(checkpoint)
    network = network_config(checkpoint, ckpt, None if carried else option_file)
    restorer = load_restorer(ckpt, None if carried else option_file, param_key, device)
    kind = feature_kind(restorer.net)
    classes = list(restorer.net.prompt_mode.task_names) if kind == CLASSIFIER else None
    images = collect(restorer, option_file)
    head, validation = fit_head(images, kind, classes)
    weights = param_key or next((k for k in PARAM_KEYS if k in checkpoint), None)
    head.fit.update(fitted_on(option_file, weights, restorer),
                    validation={k: {m: f[m] for m in ('accuracy', 'ece')} for k, f in validation['overall'].items()})
    save_with_head(ckpt, out, head, network)
    get_root_logger().info(f'Detection head of {ckpt} fitted on {len(images)} images of {option_file} '
                           f'(out of fold: {summary_line(validation)}); written with it to {out}')
    return {'out': out, 'head': head, 'validation': validation,
            'tests': {test: measure_head(restorer, head, test) for test in tests}}


class BenchmarkDetection:
    """A checkpoint's head on the benchmark's images: each image's features from the model's tested network (the
    prompt of the whole image, as restore composes it), tallied per set."""

    def __init__(self, head: DetectionHead, restorer):
        self.head, self.restorer = head, restorer
        self.tally = DetectionTally({k: head.classes(k) for k in LABEL_KINDS})

    @classmethod
    def of(cls, path: str, model, device: str, amp: Optional[str] = None) -> Optional[BenchmarkDetection]:
        """The detection of checkpoint ``path`` loaded in the BasicSR ``model``, or None when it has no head."""
        from ..utils.precision import AMP_DTYPES
        from .restore import Restorer

        head = read_head(path)
        if head is None:
            return None
        net = model._tested_net() if hasattr(model, '_tested_net') else model.get_bare_model(model.net_g)
        restorer = Restorer(net, torch.device(device), AMP_DTYPES.get(amp))
        if feature_kind(net) != head.kind:
            raise DetectionError(f'{path}: its detection head reads {head.kind} features, the network offers '
                                 f'{feature_kind(net)}')
        return cls(head, restorer)

    def observe(self, set_name: str, domain: str, task: str, lq: torch.Tensor) -> None:
        """One image ``[1, C, H, W]`` of set ``set_name`` with its true labels."""
        probabilities = self.head.predict(image_features(self.restorer, lq.float(), self.head.kind))
        self.tally.add(set_name, {'domain': domain, 'task': task}, {k: p[0].numpy() for k, p in probabilities.items()})

    def summary(self) -> dict:
        return self.tally.summary()
