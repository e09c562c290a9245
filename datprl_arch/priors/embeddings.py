"""Text embeddings of image descriptions (the domain priors) on disk, and their lookup by GT path.

File format (``torch.save`` of a dict, written atomically by ``python -m datprl_arch.tools.encode_descriptions``):

    {'format': 'datprl-description-embeddings', 'version': 1,
     'names': [str] * N,          # image names as written in the descriptions JSON ('0801.png')
     'sources': [str] * N,        # the source (data set) each name belongs to
     'embeddings': float32 [N, E] # unit-norm rows
     'encoder': str,              # what produced them, e.g. 'open_clip:RN50:RN50.pt', 'hash-ngram-v1'
     'dim': E}

It holds plain tensors, strings and lists only, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os.path as osp
from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from ..errors import DatprlError, MissingFileError
from ..utils.atomic import atomic_torch_save
from ..utils.checkpoint import load_error_summary

EMBEDDINGS_FORMAT = 'datprl-description-embeddings'
FORMAT_VERSION = 1
_WRITER = 'python -m datprl_arch.tools.encode_descriptions'


class EmbeddingsFileError(DatprlError, ValueError):
    """A description embeddings file that cannot be used; the message names it and how to write a good one."""


def name_variants(name: str) -> tuple[str, ...]:
    """The keys an image is found under: its basename with and without extension ('a/0801.png' -> 0801.png, 0801)."""
    base = osp.basename(name)
    return tuple(dict.fromkeys((base, osp.splitext(base)[0])))


class DescriptionEmbeddings:
    """Unit text embeddings ``[N, E]`` of N described images of several sources, looked up by GT path.

    ``index`` maps every unambiguous image name (basename with and without extension) to its row; a name that occurs
    in two sources is only found together with its source. Images without a description get their source's mean
    embedding (re-normalised), or the mean of all rows when the source is unknown; each source's first miss is
    logged once.
    """

    def __init__(self, names: Sequence[str], sources: Sequence[str], embeddings: torch.Tensor, encoder: str,
                 path: str = '<memory>'):
        if embeddings.dim() != 2 or not len(names) == len(sources) == len(embeddings) or not len(names):
            raise ValueError(f'{path}: description embeddings need N >= 1 names, N sources and an [N, E] tensor, '
                             f'got {len(names)} names, {len(sources)} sources, {tuple(embeddings.shape)}')
        self.names, self.sources = list(names), list(sources)
        self.embeddings = embeddings.float()
        self.encoder, self.path = encoder, path
        self.source_index: dict[tuple[str, str], int] = {}
        rows_of_key = defaultdict(set)
        for row, (name, source) in enumerate(zip(self.names, self.sources)):
            for key in name_variants(name):
                self.source_index[(source, key)] = row
                rows_of_key[key].add(row)
        self.index = {key: next(iter(rows)) for key, rows in rows_of_key.items() if len(rows) == 1}
        self.ambiguous = {key for key, rows in rows_of_key.items() if len(rows) > 1}
        self.source_means = {source: self._mean([r for r, s in enumerate(self.sources) if s == source])
                             for source in dict.fromkeys(self.sources)}
        self.global_mean = self._mean(list(range(len(self.names))))
        self._reported: set = set()

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def _mean(self, rows: list[int]) -> torch.Tensor:
        return F.normalize(self.embeddings[rows].mean(dim=0), dim=0)

    @classmethod
    def load(cls, path: str) -> 'DescriptionEmbeddings':
        """Read a file written by ``encode_descriptions`` (see the module docstring for the format)."""
        if not osp.isfile(path):
            raise MissingFileError(f'description embeddings file {path} does not exist; write it with {_WRITER}')
        try:
            data = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # torch raises several types for files that are not torch archives
            raise EmbeddingsFileError(f'{path} is not a readable description embeddings file '
                                      f'({load_error_summary(err)}); write it with {_WRITER}') from err
        if not isinstance(data, dict) or data.get('format') != EMBEDDINGS_FORMAT:
            raise EmbeddingsFileError(f"{path} is not a description embeddings file: expected a dict with format "
                                      f"'{EMBEDDINGS_FORMAT}' as written by {_WRITER}")
        if data.get('version') != FORMAT_VERSION:
            raise EmbeddingsFileError(f"{path}: unsupported description embeddings version "
                                      f"{data.get('version')!r}, this datprl reads version {FORMAT_VERSION}")
        for key, kind in (('names', list), ('sources', list), ('embeddings', torch.Tensor), ('encoder', str)):
            if not isinstance(data.get(key), kind):
                raise EmbeddingsFileError(f"{path}: key '{key}' must be a {kind.__name__}, got "
                                          f'{type(data.get(key)).__name__}')
        return cls(data['names'], data['sources'], data['embeddings'], data['encoder'], path)

    def save(self, path: str) -> None:
        """Write the file atomically (a temporary file, then a rename)."""
        atomic_torch_save({'format': EMBEDDINGS_FORMAT, 'version': FORMAT_VERSION, 'names': self.names,
                           'sources': self.sources, 'embeddings': self.embeddings.contiguous(),
                           'encoder': self.encoder, 'dim': self.dim}, path)

    def find(self, gt_path: str, source: Optional[str] = None) -> Optional[int]:
        """Row of the image at ``gt_path`` (of ``source`` when given), or None."""
        keys = name_variants(gt_path)
        if source is not None:  # a source without descriptions has none of its images in the file
            return next((self.source_index[(source, k)] for k in keys if (source, k) in self.source_index), None)
        for key in keys:
            if key in self.ambiguous:
                owners = sorted({s for (s, k) in self.source_index if k == key})
                raise ValueError(f"{self.path}: image name '{key}' is described in several sources {owners}; "
                                 f'pass the sample\'s source to the lookup')
            if key in self.index:
                return self.index[key]
        return None

    def lookup(self, gt_paths: Sequence[str], sources: Optional[Sequence[str]] = None,
               device: Optional[torch.device] = None) -> torch.Tensor:
        """Embeddings ``[B, E]`` of a batch of GT paths (``batch['gt_path']``), optionally with their source names
        (``batch['source_name']``), which disambiguate and select the fallback mean."""
        if sources is not None and len(sources) != len(gt_paths):
            raise ValueError(f'lookup got {len(gt_paths)} GT paths but {len(sources)} source names')
        rows = []
        for i, gt_path in enumerate(gt_paths):
            source = None if sources is None else str(sources[i])
            row = self.find(gt_path, source)
            rows.append(self.embeddings[row] if row is not None else self._fallback(gt_path, source))
        return torch.stack(rows).to(device) if device is not None else torch.stack(rows)

    def _fallback(self, gt_path: str, source: Optional[str]) -> torch.Tensor:
        known = source in self.source_means
        if source not in self._reported:
            from basicsr.utils import get_root_logger
            self._reported.add(source)
            what = f"the mean embedding of source '{source}'" if known else 'the mean of all embeddings'
            whose = 'an image' if source is None else f"an image of source '{source}'"
            get_root_logger().warning(f'{self.path}: {whose} has no description ({osp.basename(gt_path)}); such '
                                      f'images use {what} (logged once per source).')
        return self.source_means[source] if known else self.global_mean


def load_description_embeddings(path: str) -> tuple[dict[str, int], torch.Tensor]:
    """``(name -> row, embeddings [N, E])`` of a file written by ``encode_descriptions``; names are basenames with
    and without extension (a name described in two sources is left out: use ``DescriptionEmbeddings.lookup``)."""
    table = DescriptionEmbeddings.load(path)
    return table.index, table.embeddings
