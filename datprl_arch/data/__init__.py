"""Multi-domain paired data for BasicSR: the registered dataset, balanced sampling, image I/O and the MD-Mini demo.

Importing this package registers ``DATPRLMultiDomainDataset`` (aliases ``MultiDatasetPairedImageDataset`` and
``MultiTaskAllInOneDataset``) into BasicSR's ``DATASET_REGISTRY``.
"""
from . import multidomain_dataset  # noqa: F401  (registration)
from .multidomain_dataset import DATPRLMultiDomainDataset  # noqa: F401
