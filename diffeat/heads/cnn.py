"""The CNN head: a small conv stack on the ``C×k×k`` map, global average pool, linear.

The paper reports CNN heads (on unpooled 16×16 maps) but did not release them;
this is a plain, documented choice: ``depth`` × (3×3 conv, BatchNorm, ReLU) at
``width`` channels. A 3×3 convolution on a 1×1 map only sees its centre tap, so
the head would be an MLP in disguise: it needs ``k >= 2`` (checked before training).
"""

from __future__ import annotations

import torch
from torch import nn

from diffeat.errors import DiffeatError

MIN_POOL = 2


class CNNHead(nn.Module):
    """``depth`` × (Conv3×3 → BatchNorm2d → ReLU), AdaptiveAvgPool(1), Linear.

    Args:
        feature_shape: ``(C, k, k)`` with ``k >= 2``.
        num_classes: number of outputs.
        width: channels of every conv layer.
        depth: number of conv layers (at least 1).
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, *, width: int = 256, depth: int = 2):
        super().__init__()
        if len(feature_shape) != 3 or feature_shape[1] < MIN_POOL or feature_shape[2] < MIN_POOL:
            raise DiffeatError(f"the cnn head needs C×k×k maps with k >= {MIN_POOL}, not {tuple(feature_shape)}")
        if width < 1 or depth < 1:
            raise DiffeatError(f"cnn width and depth must be >= 1 (got width={width}, depth={depth})")
        self.config = {"width": int(width), "depth": int(depth)}
        layers: list[nn.Module] = []
        c = feature_shape[0]
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.convs(x)).flatten(1))
