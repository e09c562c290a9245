"""Multi-domain paired data for BasicSR: the registered dataset, its sources and checks, balanced sampling, image I/O,
LMDBs (``lmdb/``) and the synthetic degradations of ``mode: synth`` sources.

Importing this package registers ``DATPRLMultiDomainDataset`` (aliases ``MultiDatasetPairedImageDataset`` and
``MultiTaskAllInOneDataset``) into BasicSR's ``DATASET_REGISTRY``.
"""
from . import multidomain_dataset  # noqa: F401  (registration)
from .multidomain_dataset import DATPRLMultiDomainDataset  # noqa: F401
