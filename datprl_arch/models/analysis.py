"""Prompt analysis on validation images: which prompts each source selects, how well selections separate tasks and
domains, how the blocks weigh features against the prompt, and where the composed prompts lie.

Written into ``<save_path>/<tag>/``: ``selection.json`` (per-source histograms of selected prompts per pool),
``nmi.json`` (normalised mutual information between the top-1 prompt and the task / domain / source labels),
``gates.json`` (each prompted block's AGF weights ``a_f``, ``a_p``), ``prompts_2d.json`` (a PCA projection of the
composed prompts) and, with matplotlib installed, ``selection.png`` and ``prompts_2d.png``.
"""
from __future__ import annotations

import os
from collections import defaultdict
from os import path as osp

import numpy as np
from torch import nn

from ..archs.prompt import PromptedBlock, PromptState
from ..utils.atomic import atomic_write_json

LABEL_KINDS = ('task', 'domain', 'source')
PROJECTION_DIMS = 2


def normalized_mutual_information(a, b) -> float:
    """NMI of two discrete labelings: ``2 I(A;B) / (H(A) + H(B))``; 1 when one determines the other, 0 when
    independent (and 1 when both are constant)."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    denominator = entropy(pa) + entropy(pb)
    return 1.0 if denominator == 0 else 2 * mutual / denominator


def gate_values(net: nn.Module) -> dict:
    """``{block name: {'feature': a_f, 'prompt': a_p}}`` for every prompted block."""
    out = {}
    for name, block in net.named_modules():
        if isinstance(block, PromptedBlock) and block.fusion_method is not None:
            a_f, a_p = block.gates()
            out[name] = {"feature": a_f.item(), "prompt": a_p.item()}
    return out


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Rows of ``x [N, D]`` projected on their first two principal components ``[N, 2]``."""
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:PROJECTION_DIMS].T


class PromptAnalysis:
    """Accumulates prompt retrievals of labelled images, then writes the analysis of the round."""

    def __init__(self, save_path: str):
        self.save_path = save_path
        self.records = []

    def collect(self, state: PromptState, labels: dict) -> None:
        """``labels``: ``{'task': name, 'domain': name, 'source': name}`` of the images in ``state`` (one batch)."""
        for i in range(state.prompt.shape[0]):
            record = {'labels': labels, 'prompt': state.prompt[i].float().cpu().numpy()}
            if getattr(state, 'task', None) is not None:  # dual pools; a prompt mode (ModeState) has none
                record['task_pool'] = state.task.indices[i].tolist()
            if getattr(state, 'domain', None) is not None:
                record['domain_pool'] = state.domain.indices[i].tolist()
            self.records.append(record)

    def write(self, tag, net: nn.Module) -> str:
        """Write the analysis of everything collected into ``<save_path>/<tag>``; returns that folder."""
        folder = osp.join(self.save_path, str(tag))
        os.makedirs(folder, exist_ok=True)
        pools = [p for p in ('task_pool', 'domain_pool') if self.records and p in self.records[0]]
        selection = {pool: defaultdict(lambda: defaultdict(int)) for pool in pools}
        for r in self.records:
            for pool in pools:
                for idx in r[pool]:
                    selection[pool][r['labels']['source']][idx] += 1
        atomic_write_json({p: {s: dict(sorted(c.items())) for s, c in v.items()} for p, v in selection.items()},
                          osp.join(folder, 'selection.json'))
        nmi = {pool: {kind: normalized_mutual_information([r[pool][0] for r in self.records],
                                                          [r['labels'][kind] for r in self.records])
                      for kind in LABEL_KINDS} for pool in pools}
        atomic_write_json(nmi, osp.join(folder, 'nmi.json'))
        atomic_write_json(gate_values(net), osp.join(folder, 'gates.json'))
        sources = [r['labels']['source'] for r in self.records]
        coords = pca_2d(np.stack([r['prompt'] for r in self.records])) if len(self.records) > 1 else np.zeros((1, 2))
        atomic_write_json({'source': sources, 'xy': coords.tolist()}, osp.join(folder, 'prompts_2d.json'))
        self._plot(folder, selection, sources, coords)
        self.records = []
        return folder

    @staticmethod
    def _plot(folder, selection, sources, coords) -> None:
        try:
            import matplotlib
            matplotlib.use('Agg')
            from matplotlib import pyplot as plt
        except ImportError:
            return
        fig, axes = plt.subplots(1, len(selection), figsize=(6 * len(selection), 4), squeeze=False)
        for ax, (pool, per_source) in zip(axes[0], selection.items()):
            size = 1 + max((i for c in per_source.values() for i in c), default=0)
            width = 0.8 / max(len(per_source), 1)
            for k, (source, counts) in enumerate(sorted(per_source.items())):
                ax.bar(np.arange(size) + k * width, [counts.get(i, 0) for i in range(size)], width, label=source)
            ax.set(title=pool, xlabel='prompt', ylabel='selections')
            ax.legend(fontsize='small')
        fig.tight_layout()
        fig.savefig(osp.join(folder, 'selection.png'))
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 5))
        for source in sorted(set(sources)):
            mask = np.array([s == source for s in sources])
            ax.scatter(coords[mask, 0], coords[mask, 1], s=12, label=source)
        ax.set(title='composed prompts (PCA)')
        ax.legend(fontsize='small')
        fig.savefig(osp.join(folder, 'prompts_2d.png'))
        plt.close(fig)
