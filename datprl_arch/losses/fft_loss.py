"""L1 distance between the 2-D real FFTs of the restored image and the ground truth (the official ``FFTLoss``)."""
from __future__ import annotations

import torch
from torch import nn

from basicsr.losses.basic_loss import l1_loss
from basicsr.utils.registry import LOSS_REGISTRY

from ..utils.registry import register
from .precision import float32

REDUCTIONS = ('none', 'mean', 'sum')


@register(LOSS_REGISTRY, aliases=('FFTLoss',))
class DATPRLFFTLoss(nn.Module):
    """Frequency-domain L1: ``loss_weight * L1(stack(Re, Im)(rfft2(pred)), stack(Re, Im)(rfft2(target)))``.

    The FFT runs over the last two dims (H, W) of ``[B, C, H, W]`` inputs, giving ``[B, C, H, W//2+1]`` complex
    spectra; real and imaginary parts are stacked as a last axis of size 2 before the L1. This is the MD (BasicSR)
    release's loss (``rfft2``, unnormalised); its configs use ``loss_weight: 0.1``. ``full: true`` uses the full
    ``fft2`` (``W`` columns) as the natural 3-/5-task Lightning code does, which weighs the mean slightly differently.
    Computed in float32.

    Args:
        loss_weight: multiplier of the loss.
        reduction: 'mean' (default), 'sum', or 'none' (returns ``[B, C, H, W//2+1, 2]``, ``W`` with ``full``).
        full: full complex spectrum (``fft2``) instead of the real one (``rfft2``).
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', full: bool = False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f'FFTLoss reduction must be one of {REDUCTIONS}, got {reduction!r}')
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.fft = torch.fft.fft2 if full else torch.fft.rfft2

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        """pred, target ``[..., H, W]`` of the same shape -> scalar (or the per-element loss for 'none')."""
        if pred.shape != target.shape:
            raise ValueError(f'FFTLoss needs pred and target of one shape, got {tuple(pred.shape)} and '
                             f'{tuple(target.shape)}')
        with float32(pred.device):
            pred_spectrum = torch.view_as_real(self.fft(pred.float()))
            target_spectrum = torch.view_as_real(self.fft(target.float()))
            return self.loss_weight * l1_loss(pred_spectrum, target_spectrum, None, reduction=self.reduction)
