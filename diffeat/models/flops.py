"""What an extraction costs: FLOPs per image and the parameters a truncated forward uses.

Both are measured, not estimated: a forward pass of a meta-device copy of the
U-Net (no weights in memory, no arithmetic) runs under
``torch.utils.flop_counter.FlopCounterMode``, truncated right after the requested
block exactly as extraction truncates it (``capture_blocks``). So the full-width
550M-parameter ADM-256 is costed in a second on a laptop.

FLOPs count a multiply-add as 2 (PyTorch's convention); papers that quote
"GFLOPs" for U-Nets (DiT: ADM ~1120) usually count multiply-adds, i.e. half.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffeat.models.blocks import (
    block_modules,
    capture_blocks,
    check_blocks,
    check_resolution,
    meta_copy,
    model_inputs,
)

logger = logging.getLogger(__name__)


def _meta_run(unet: nn.Module, resolution: int | None, block: int | None) -> tuple[nn.Module, Callable[[], None]]:
    """A meta copy of ``unet`` and a function running one image through it (up to ``block``)."""
    config = unet.config
    if resolution is None:
        size = config.sample_size
        resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    check_resolution(unet, resolution)
    meta = meta_copy(unet)
    x = torch.zeros(1, config.in_channels, resolution, resolution, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    if getattr(config, "num_class_embeds", None):
        # a class-conditional model costs the same with any label; model_inputs refuses it on purpose
        inputs = {"class_labels": torch.zeros(1, dtype=torch.long, device="meta")}
    else:
        inputs = model_inputs(meta, 1, "meta", torch.float32)

    def run() -> None:
        with torch.no_grad():
            if block is None:
                meta(x, t, **inputs)
            else:
                capture_blocks(meta, x, t, [block], **inputs)

    return meta, run


def count_flops(unet: nn.Module, resolution: int | None = None, block: int | None = None) -> int:
    """FLOPs of one image through ``unet`` at ``resolution`` (default: its native size).

    With ``block`` the forward stops right after that block (1-based, as in the
    paper), as feature extraction does; with None it is the full forward.
    """
    if block is not None:
        check_blocks([block], len(block_modules(unet)))
    _, run = _meta_run(unet, resolution, block)
    with FlopCounterMode(display=False) as counter:
        run()
    total = int(counter.get_total_flops())
    logger.debug("%s up to block %s: %d FLOPs", type(unet).__name__, block, total)
    return total


def count_parameters(unet: nn.Module, block: int | None = None, resolution: int | None = None) -> int:
    """Number of parameters of ``unet``; with ``block``, only those the truncated forward uses.

    "Used" is measured: every module holding parameters that runs before the
    forward stops after ``block`` counts. The rest could be deleted for extraction.
    """
    if block is None:
        return sum(p.numel() for p in unet.parameters())
    check_blocks([block], len(block_modules(unet)))
    meta, run = _meta_run(unet, resolution, block)
    used: set[str] = set()
    handles = []
    for name, module in meta.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: used.add(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    modules = dict(meta.named_modules())
    return sum(p.numel() for name in used for p in modules[name].parameters(recurse=False))
