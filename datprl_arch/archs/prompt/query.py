"""Pool queries: a small convolutional network from a feature map ``[B, C, H, W]`` to a query vector ``[B, D]``."""
from __future__ import annotations

from types import MappingProxyType

from torch import nn

#: Pooled grid sizes before each query's two convolutions, by tap: the domain query looks at (large) stem features,
#: the task query at (small) deep features.
QUERY_GRIDS = MappingProxyType({'domain': (8, 4), 'task': (4, 2)})


class PoolQuery(nn.Module):
    """Pool to ``grid[0]``, conv C->C/2, pool to ``grid[1]``, conv C/2->C/4, global pool, linear to ``query_dim``.

    Adaptive pooling first makes the query cost independent of the image size.
    """

    def __init__(self, in_channels: int, query_dim: int, grid: tuple[int, int]):
        super().__init__()
        half, quarter = in_channels // 2, in_channels // 4
        self.mapper = nn.Sequential(
            nn.AdaptiveAvgPool2d(grid[0]), nn.Conv2d(in_channels, half, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(grid[1]), nn.Conv2d(half, quarter, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(quarter, query_dim))

    def forward(self, features):
        """features ``[B, C, H, W]`` -> query ``[B, D]``."""
        return self.mapper(features)
