"""MD-Mini: a small multi-domain restoration benchmark built from images that installed packages ship.

Nine degraded sources and three clean ones over three domains (natural x4 SR, deraining, deblurring; MRI x4 SR,
low-dose CT and low-count nuclear-medicine denoising in 16 bits; remote-sensing x4 SR, cloud removal and dehazing),
split by source image; training LQ is synthesised per crop with random parameters, val/test pairs are fixed LMDBs,
and an out-of-sample check uses images MD-Mini never trains or tests on. Modules: ``images`` (what the packages
ship), ``split`` (the split policy), ``tasks`` (degradations and their parameters), ``build`` (writing it all).
"""
from .build import DEFAULT_OUT, MiniBuildError, build, dataset_options
from .tasks import CLEAN_TASKS, DOMAINS, TASKS, Task

__all__ = ['CLEAN_TASKS', 'DEFAULT_OUT', 'DOMAINS', 'MiniBuildError', 'TASKS', 'Task', 'build', 'dataset_options']
