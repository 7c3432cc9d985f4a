"""The MLP head: Linear layers with ReLU between them on the flattened map (the paper's ``--head_arc``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from diffeat.errors import DiffeatError


class MLPHead(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden layer, then ``Linear(hidden[-1], num_classes)``.

    No normalisation and no dropout, as in the paper's released ``Head``
    (``--head_arc "2048"`` is ``hidden=(2048,)``; ``"2048_1024"`` is two layers).

    Args:
        feature_shape: one sample's shape, ``(C, k, k)`` or ``(D,)``.
        num_classes: number of outputs.
        hidden: widths of the hidden layers (at least one).
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, *, hidden: Sequence[int] = (2048,)):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise DiffeatError(f"mlp hidden layers must be positive widths, e.g. --mlp-hidden 2048, not {hidden}")
        self.config = {"hidden": hidden}
        dims = [math.prod(feature_shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))
