"""Per-image weights that put every task of a multi-task batch on the same footing in the pixel loss.

The benchmark asks for a gain in dB over each input, i.e. a relative improvement, while a plain L1 loss counts
absolute errors: a 10 dB hazy image and a 30 dB x4 SR image get the same per-pixel gradient, and the network spends
its capacity where absolute errors are large. Two weightings (``train.pixel_weighting``), each constant per image:

- ``output_error``: ``1 / max(mean|out - gt|, floor)`` with the output detached, i.e. the gradient of
  ``log(mean|out - gt|)``: the loss of the mean log error, whose improvement is the mean gain in dB of all images;
- ``input_error``: ``1 / max(mean|lq - gt|, floor)``, fixed by the input: the error relative to doing nothing.

``power`` (``train.pixel_weight_power``, default 1) softens either weighting: ``weight ** power``, so 0.5 sits
between the plain loss (0) and the full equalisation (1).

The floor keeps clean inputs (error near 0) from taking over the batch. The weights go through BasicSR's own loss
weighting (``weight=``), whose weighted mean divides by the weight sum, so only their ratios matter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Modes of ``train.pixel_weighting``.
PIXEL_WEIGHTINGS = ('none', 'input_error', 'output_error')
#: Default floor of the error (mean absolute error in [0, 1] units, about 2.5/255, i.e. roughly 40 dB).
DEFAULT_FLOOR = 0.01


def error_weights(reference: torch.Tensor, gt: torch.Tensor, floor: float = DEFAULT_FLOOR, power: float = 1.0
                  ) -> torch.Tensor:
    """``[B, 1, H, W]`` element weights (constant per image) ``max(mean|reference - gt|, floor) ** -power`` for ``gt``
    ``[B, C, H, W]``; ``reference`` (the input or the detached output) is bicubically resized to the GT size when
    the network upsamples."""
    reference = reference.detach()
    if reference.shape[-2:] != gt.shape[-2:]:
        reference = F.interpolate(reference, size=gt.shape[-2:], mode='bicubic', align_corners=False)
    error = (reference.float() - gt.float()).abs().mean(dim=(1, 2, 3)).clamp_min(floor)
    return error.pow(-power).view(-1, 1, 1, 1).expand(gt.shape[0], 1, *gt.shape[-2:])
