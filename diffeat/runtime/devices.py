"""Choosing the torch device from a ``--device`` option (one definition for every stage)."""

from __future__ import annotations

import torch

from diffeat.errors import DiffeatError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuse a cuda device that is not there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DiffeatError(f"--device {device!r} is not a device (use cpu, cuda, cuda:1 or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffeatError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    return dev
