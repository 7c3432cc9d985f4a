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
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from diffeat.models.families.base import FeatureModel

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
    return _used_parameters(meta, run)


def _used_parameters(module: nn.Module, run: Callable[[], None]) -> int:
    """Parameters of the submodules of ``module`` that ``run()`` calls (measured with pre-hooks)."""
    used: set[str] = set()
    handles = []
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)):
            handles.append(sub.register_forward_pre_hook(lambda _m, _a, name=name: used.add(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    modules = dict(module.named_modules())
    return sum(p.numel() for name in used for p in modules[name].parameters(recurse=False))


def _family_run(model: FeatureModel, resolution: int | None, block: int | None
                ) -> tuple[FeatureModel, Callable[[], None]]:
    """A meta copy of a family's model and a function running one image through it (up to ``block``)."""
    meta = model.on_meta()
    resolution = resolution or meta.native_resolution
    x = torch.zeros(1, *meta.input_shape(resolution), device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    fwd = None if block is None else meta.feature_forward([block])

    def run() -> None:
        with torch.no_grad():
            if fwd is None:
                meta.full_forward(x, t)
            else:
                fwd(x, t)

    return meta, run


def count_model_flops(model: FeatureModel, resolution: int | None = None, block: int | None = None) -> int:
    """FLOPs of one image through any family's denoiser at ``resolution`` pixels (default: native).

    With ``block``, up to that block as extraction runs it (the family's truncated forward);
    with None, the model's own full forward. Pixel U-Nets are counted by ``count_flops``, as
    always. The VAE is not included (``count_vae_flops``).
    """
    if model.family == "pixel-unet":
        return count_flops(model.denoiser, resolution, block)
    _, run = _family_run(model, resolution, block)
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def count_vae_flops(model: FeatureModel, resolution: int | None = None) -> int:
    """FLOPs of encoding one image to latents (0 for pixel-space models)."""
    if not model.latent:
        return 0
    meta = model.on_meta()
    resolution = resolution or meta.native_resolution
    x = torch.zeros(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.encode(x)
    return int(counter.get_total_flops())


def count_model_parameters(model: FeatureModel, block: int | None = None, resolution: int | None = None) -> int:
    """Parameters of any family's denoiser; with ``block``, only those the truncated forward uses (measured)."""
    if model.family == "pixel-unet":
        return count_parameters(model.denoiser, block, resolution)
    if block is None:
        return sum(p.numel() for p in model.denoiser.parameters())
    meta, run = _family_run(model, resolution, block)
    return _used_parameters(meta.denoiser, run)
