"""What "block N" is: a block table computed from the model, and a forward that stops early.

The paper numbers the activations of guided-diffusion's U-Net 1-based over one flat
list: ``input_blocks[0..]``, then ``middle_block``, then ``output_blocks[0..]``
(37 blocks for ADM-256; block 24 = ``output_blocks[4]``, 1024×16×16 at 256 px).

The same numbering is computed here from any diffusers ``UNet2DModel`` or
``UNet2DConditionModel`` (never typed in by hand):

* block 1 is ``conv_in``;
* each down level contributes its layers (the attention module if the level has
  attention, else the resnet), then its downsampler;
* then ``mid_block``;
* each up level contributes its layers, where the LAST layer of a level is the
  whole ``up_blocks[u]``: guided-diffusion's output block includes the upsampler,
  which diffusers keeps as a separate module, so only the up block's own output
  has the ADM tensor.

Channels and resolution of every block are measured by one forward pass on the
meta device (no memory, no compute), so the table is exactly what hooks see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffeat.errors import DiffeatError, ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockInfo:
    """One block of the paper's numbering, located in a diffusers U-Net."""

    index: int  # 1-based, as in the paper
    module: str  # dotted module path whose forward output is the block's activation
    adm_name: str  # the guided-diffusion name: "input_blocks.4", "middle_block", "output_blocks.4"
    channels: int
    height: int
    width: int

    def as_dict(self) -> dict:
        """A JSON-friendly dict of the fields."""
        return asdict(self)


def _has_attention(level: nn.Module) -> bool:
    attentions = getattr(level, "attentions", None)
    return attentions is not None and len(attentions) > 0


def _layer_name(prefix: str, level: nn.Module, slot: int) -> str:
    kind = "attentions" if _has_attention(level) else "resnets"
    return f"{prefix}.{kind}.{slot}"


def block_modules(unet: nn.Module) -> list[tuple[str, str]]:
    """Return ``(module path, ADM name)`` for every block, in the paper's order.

    Works on the module structure alone (no forward pass).
    """
    for name in ("conv_in", "down_blocks", "mid_block", "up_blocks"):
        if getattr(unet, name, None) is None:
            raise ModelError(
                f"{type(unet).__name__} is not a diffusers U-Net: it has no `{name}` "
                "(expected a UNet2DModel or UNet2DConditionModel)"
            )
    out = [("conv_in", "input_blocks.0")]
    for d, level in enumerate(unet.down_blocks):
        for slot in range(len(level.resnets)):
            out.append((_layer_name(f"down_blocks.{d}", level, slot), ""))
        if getattr(level, "downsamplers", None):
            out.append((f"down_blocks.{d}.downsamplers.0", ""))
    n_in = len(out)
    out = [(m, f"input_blocks.{i}") for i, (m, _) in enumerate(out)]
    out.append(("mid_block", "middle_block"))
    m = 0
    for u, level in enumerate(unet.up_blocks):
        n_layers = len(level.resnets)
        for slot in range(n_layers):
            module = f"up_blocks.{u}" if slot == n_layers - 1 else _layer_name(f"up_blocks.{u}", level, slot)
            out.append((module, f"output_blocks.{m}"))
            m += 1
    logger.debug("block table: %d input, 1 middle, %d output blocks", n_in, m)
    return out


class _StopForward(Exception):
    """Raised by a hook once every requested block has been captured."""


def _as_tensor(output: object) -> torch.Tensor:
    # Transformer2DModel returns a tuple (return_dict=False) or an output object.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample  # type: ignore[attr-defined]


def model_inputs(unet: nn.Module, batch: int, device: torch.device | str, dtype: torch.dtype) -> dict:
    """Extra keyword inputs an unconditional feature forward needs for this U-Net.

    ``UNet2DConditionModel`` needs ``encoder_hidden_states``; diffeat passes zeros
    (a null conditioning). Class-conditional models are refused: feeding the true
    label would leak it into the features.
    """
    config = getattr(unet, "config", None)
    if config is not None and getattr(config, "num_class_embeds", None):
        raise ModelError(
            "this U-Net is class-conditional (num_class_embeds="
            f"{config.num_class_embeds}); diffeat extracts features from unconditional models only, "
            "since a class label would leak the answer into the features"
        )
    if config is not None and getattr(config, "cross_attention_dim", None):
        dim = config.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        return {"encoder_hidden_states": torch.zeros(batch, 1, dim, device=device, dtype=dtype)}
    return {}


def capture_blocks(
    unet: nn.Module,
    x: torch.Tensor,
    t: int | torch.Tensor,
    blocks: Sequence[int],
    **inputs: object,
) -> dict[int, torch.Tensor]:
    """Run ``unet`` on ``x`` at timestep ``t`` and return the requested blocks' activations.

    One forward pass captures every requested block; it stops right after the
    deepest one, so later blocks cost nothing. Extra ``inputs`` are passed to the
    U-Net (``model_inputs`` gives the ones it needs).
    """
    if not blocks:
        raise DiffeatError("no block requested")
    table = block_modules(unet)
    check_blocks(blocks, len(table))
    wanted = {table[b - 1][0]: b for b in sorted(set(blocks))}
    deepest = max(blocks)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(index: int):
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            captured[index] = _as_tensor(output)
            if index == deepest:
                raise _StopForward

        return hook

    modules = dict(unet.named_modules())
    for name, index in wanted.items():
        handles.append(modules[name].register_forward_hook(make_hook(index)))
    if not inputs:
        inputs = model_inputs(unet, x.shape[0], x.device, x.dtype)
    try:
        unet(x, t, **inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def check_blocks(blocks: Sequence[int], n_blocks: int) -> None:
    """Raise a ``DiffeatError`` naming the valid range if a block does not exist."""
    bad = [b for b in blocks if not isinstance(b, int) or not 1 <= b <= n_blocks]
    if bad:
        raise DiffeatError(
            f"--block {bad[0]} does not exist: this model has blocks 1..{n_blocks} "
            "(1-based, as in the paper; `diffeat blocks --model ...` lists them)"
        )


def meta_copy(unet: nn.Module) -> nn.Module:
    """The same architecture on the meta device (weights cost no memory)."""
    config = getattr(unet, "config", None)
    if config is not None and hasattr(type(unet), "from_config"):
        with torch.device("meta"):
            return type(unet).from_config(config)
    raise ModelError(f"cannot compute the block table of {type(unet).__name__}: it has no diffusers config")


def block_table(unet: nn.Module, resolution: int | None = None, inputs: dict | None = None) -> list[BlockInfo]:
    """Compute the block table of ``unet`` at input ``resolution`` (default: its sample size).

    Shapes come from hooks on a meta-device forward, so they are exactly what a
    real forward produces, at no cost even for a 550M-parameter model. ``inputs``:
    the extra forward inputs on the meta device, batch 1 (default: a one-token null
    text conditioning for a conditional U-Net; SDXL's added conditions come from
    its family, ``diffeat.models.families.latent_unet``).
    """
    config = unet.config
    if resolution is None:
        size = config.sample_size
        resolution = size[0] if isinstance(size, (list, tuple)) else int(size)
    check_resolution(unet, resolution)
    modules = block_modules(unet)
    meta = meta_copy(unet)
    x = torch.zeros(1, config.in_channels, resolution, resolution, device="meta")
    if inputs is None:
        inputs = {}
        if getattr(config, "cross_attention_dim", None):
            dim = config.cross_attention_dim
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            inputs["encoder_hidden_states"] = torch.zeros(1, 1, dim, device="meta")
    else:
        inputs = dict(inputs)
    if getattr(config, "num_class_embeds", None):
        inputs["class_labels"] = torch.zeros(1, dtype=torch.long, device="meta")
    acts = capture_blocks(meta, x, torch.zeros(1, device="meta"), range(1, len(modules) + 1), **inputs)
    table = []
    for i, (module, adm_name) in enumerate(modules, start=1):
        _, c, h, w = acts[i].shape
        table.append(BlockInfo(i, module, adm_name, int(c), int(h), int(w)))
    return table


def check_resolution(unet: nn.Module, resolution: int) -> None:
    """Refuse a resolution the U-Net cannot take (it must halve cleanly at every level)."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution <= 0 or resolution % factor:
        raise DiffeatError(
            f"--resolution {resolution} does not fit this U-Net: it must be a positive multiple of {factor} "
            f"(the model downsamples {len(unet.config.block_out_channels) - 1} times); "
            f"its native size is {unet.config.sample_size}"
        )
