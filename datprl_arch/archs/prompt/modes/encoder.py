"""The small image encoders of the prompt modes: MiO IR's prompt encoder and a task classifier built on it."""
from __future__ import annotations

import torch
from torch import nn

ENCODER_CHANNELS = 64  # MiO's F_ext width
ENCODER_KERNELS = (7, 3, 3)  # MiO's F_ext: three stride-2 convolutions


class ImageEncoder(nn.Module):
    """MiO IR's prompt encoder F_ext: three stride-2 convolutions (7x7, 3x3, 3x3) with ReLU, then a global
    average: image ``[B, C, H, W]`` -> ``[B, channels]``. Any input size (the average removes it)."""

    def __init__(self, in_channels: int, channels: int = ENCODER_CHANNELS):
        super().__init__()
        layers, width = [], in_channels
        for kernel in ENCODER_KERNELS:
            layers += [nn.Conv2d(width, channels, kernel, stride=2, padding=kernel // 2), nn.ReLU(inplace=True)]
            width = channels
        self.body = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(-2, -1))


class TaskClassifier(nn.Module):
    """Degraded image ``[B, C, H, W]`` -> task logits ``[B, T]``: an :class:`ImageEncoder` and a linear layer (our
    choice; MiO's separately trained classifier is a five-layer CNN of the same role)."""

    def __init__(self, in_channels: int, num_tasks: int, channels: int = ENCODER_CHANNELS):
        super().__init__()
        self.encoder = ImageEncoder(in_channels, channels)
        self.head = nn.Linear(channels, num_tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
