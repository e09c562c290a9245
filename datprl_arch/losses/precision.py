"""Float32 math for the losses: cosine similarities, softmaxes and FFTs lose too much precision in fp16/bf16.

Inside ``float32(device)`` autocast is off, so ``x.float() @ y.float().t()`` really runs in float32 even when the
training step runs under ``torch.autocast``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def float32(device: torch.device):
    """Context manager that disables autocast on ``device``'s type; cast the inputs with ``.float()`` inside it.

    A device type without autocast (``meta``) has nothing to disable."""
    if not torch.amp.is_autocast_available(device.type):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)
