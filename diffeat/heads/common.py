"""Pieces shared by every head: the frozen standardiser and the saved-probe wrapper."""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) * inv_std`` with fixed statistics (buffers, never trained).

    The statistics come from the train split (computed in float64 by a streaming
    pass, see ``diffeat.probe.data``) and are stored with the head, so a saved
    probe applies to raw stored features. ``mean``/``inv_std`` broadcast against
    one sample's feature shape: ``(C, k, k)`` for per-feature statistics,
    ``(C, 1, 1)`` for per-channel ones, ``(D,)`` for flat imported features.
    """

    def __init__(self, mean: torch.Tensor, inv_std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("inv_std", inv_std.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class Probe(nn.Module):
    """A trained probe as saved: standardiser followed by the head.

    ``forward`` takes raw stored features of shape ``(B, *feature_shape)`` and
    returns logits ``(B, num_classes)``.
    """

    def __init__(self, standardize: nn.Module, head: nn.Module):
        super().__init__()
        self.standardize = standardize
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardize(x))
