"""The tasks of MD-Mini: which pool each source draws from, how its LQ is made, and with which parameters.

Three parameter sets per degradation (see :mod:`datprl_arch.data.degradations`):

- test/val: the degradation's defaults, fixed per image (seeded), written as LMDB pairs;
- train: wider ranges, drawn afresh for every training crop by the dataset (``mode: synth``), so the network
  learns the task rather than a dozen fixed pairs;
- unseen: other parameters inside the training ranges, on images MD-Mini never uses (the out-of-sample check).
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Task:
    """A source of MD-Mini: ``name``, labels, the pool of clean images, the degradation and its parameter sets."""

    name: str
    domain: str
    task: str
    pool: str
    degradation: str
    what: str  # template description of the degradation
    train: Optional[dict] = None
    unseen: Optional[dict] = None
    bit_depth: int = 8


#: Training share of a clean source (its input is its target) relative to a degraded source.
CLEAN_WEIGHT = 2.0
_SR_TRAIN = {'kernel': ['bicubic', 'bicubic', 'area', 'bilinear']}

TASKS = (
    Task('natural_sr4', 'natural', 'sr4', 'natural', 'sr', 'downscaled x4 and upscaled back, blurry',
         train=_SR_TRAIN, unseen={'kernel': 'area'}),
    Task('natural_derain', 'natural', 'derain', 'natural', 'rain', 'covered by rain streaks',
         train={'layers': [1, 3], 'length': [8, 48], 'angle': [-50, 50], 'density': [0.001, 0.015],
                'opacity': [0.3, 0.95]},
         unseen={'layers': [2, 3], 'length': [30, 45], 'angle': [-45, 45], 'density': [0.006, 0.012],
                 'opacity': [0.6, 0.9]}),
    Task('natural_deblur', 'natural', 'deblur', 'natural', 'motion_blur', 'blurred by camera shake',
         train={'size': [5, 33]}, unseen={'size': [25, 31]}),
    Task('medical_mri_sr4', 'medical', 'mri_sr4', 'mri', 'kspace_sr', 'reconstructed from the central quarter of '
         'k-space', train={'window': ['box', 'hamming']}, unseen={'window': 'hamming'}, bit_depth=16),
    Task('medical_ct_denoise', 'medical', 'ct_denoise', 'ct', 'ct_low_dose', 'reconstructed from a low-dose, noisy '
         'sinogram', train={'photons': [1.5e3, 2.5e4]}, bit_depth=16),
    Task('medical_nm_denoise', 'medical', 'nm_denoise', 'nm', 'low_count', 'acquired with few counts, noisy',
         train={'peak': [4.0, 80.0]}, unseen={'peak': [10.0, 30.0]}, bit_depth=16),
    Task('rs_sr4', 'remote_sensing', 'sr4', 'remote_sensing', 'sr', 'downscaled x4 and upscaled back, blurry',
         train=_SR_TRAIN, unseen={'kernel': 'area'}),
    Task('rs_decloud', 'remote_sensing', 'decloud', 'remote_sensing', 'clouds', 'partly covered by clouds',
         train={'beta': [2.2, 3.6], 'cover': [0.15, 0.75], 'brightness': [0.7, 1.0]},
         unseen={'beta': [2.4, 3.0], 'cover': [0.2, 0.35], 'brightness': [0.75, 0.9]}),
    Task('rs_dehaze', 'remote_sensing', 'dehaze', 'remote_sensing', 'haze', 'seen through haze',
         train={'beta': [0.3, 1.8], 'airlight': [0.55, 1.0]}, unseen={'beta': [0.4, 0.8], 'airlight': [0.6, 0.75]}),
)
#: Clean training sources, one per domain (the target is the input: leave a clean image alone).
CLEAN_TASKS = (
    Task('natural_clean', 'natural', 'clean', 'natural', 'identity', 'clean', train={}, unseen={}),
    Task('medical_clean', 'medical', 'clean', 'mri', 'identity', 'clean', train={}, unseen={}, bit_depth=16),
    Task('rs_clean', 'remote_sensing', 'clean', 'remote_sensing', 'identity', 'clean', train={}, unseen={}),
)
DOMAINS = ('natural', 'medical', 'remote_sensing')
DOMAIN_WORDS = {'natural': 'a natural photograph', 'medical': 'a medical scan', 'remote_sensing': 'a satellite image'}
#: Domain of each pool (medical pools are one modality each).
POOL_DOMAIN = {'natural': 'natural', 'remote_sensing': 'remote_sensing', 'mri': 'medical', 'ct': 'medical',
               'nm': 'medical'}
