"""Per-image weights that put every task on the same footing in the pixel loss.

In a multi-task batch an L1 loss is dominated by the images whose input is far from the target: a hazy image at
9 dB contributes ten times the error of a x4 SR image at 30 dB, so the network learns dehazing and neglects (or
harms) the easy tasks. Weighting each image by the inverse of its input's own error, ``1 / max(mean|lq - gt|,
floor)``, makes the loss measure the error relative to the input, i.e. the improvement over doing nothing. The floor
keeps clean inputs (error 0) from taking over the batch. The weights go through BasicSR's own loss weighting
(``weight=``), whose weighted mean divides by the weight sum, so only their ratios matter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Modes of ``train.pixel_weighting``.
PIXEL_WEIGHTINGS = ('none', 'input_error')
#: Default floor of the input error (mean absolute error in [0, 1] units, about 5/255).
DEFAULT_FLOOR = 0.02


def input_error_weights(lq: torch.Tensor, gt: torch.Tensor, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """``[B, 1, H, W]`` element weights (constant per image) ``1 / max(mean|lq - gt|, floor)`` for ``gt`` ``[B, C,
    H, W]``; ``lq`` is bicubically resized to the GT size when the network upsamples."""
    if lq.shape[-2:] != gt.shape[-2:]:
        lq = F.interpolate(lq, size=gt.shape[-2:], mode='bicubic', align_corners=False)
    error = (lq.float() - gt.float()).abs().mean(dim=(1, 2, 3)).clamp_min(floor)
    return (1.0 / error).view(-1, 1, 1, 1).expand(gt.shape[0], 1, *gt.shape[-2:])
