"""An explicit, hook-free forward of a diffusers U-Net that stops right after the deepest requested block.

``capture_blocks`` (``diffeat.models.blocks``) gets block activations with forward
hooks and an exception; it works on any U-Net, but it rebuilds the block table on
every call, keeps every skip activation of the down path, and cannot be compiled
(the exception is a graph break, hooks are opaque to ``torch.compile``).

``TruncatedUNet`` is the same computation written out once per (model, blocks):

* the time embedding, ``conv_in``, the down levels layer by layer (resnet, then
  attention if the level has it; then the downsampler), ``mid_block``, and the up
  levels layer by layer (concatenate the popped skip, resnet, attention, and the
  upsampler after a level's last layer), in exactly the order and with exactly
  the calls diffusers' own ``forward`` makes, so the values are bitwise those of
  ``capture_blocks``;
* one *step* per block of the paper's numbering: the steps are generated from the
  module structure and checked against ``block_modules`` (the numbering is never
  typed in), and the list is cut after the deepest requested block, so no later
  module ever runs;
* skip activations that no executed up layer pops are never kept: for ADM-256
  block 24 only the last 5 of the 18 skips are held, which frees the 256² and
  128² maps (most of the activation memory) as soon as the next layer has used them;
* no hooks, no exceptions, no data-dependent control flow: ``torch.compile``
  traces it into one graph.

Supported: ``UNet2DModel`` and ``UNet2DConditionModel`` (with the text
conditioning its family gives: the empty prompt's embeddings for a Stable
Diffusion pipeline, an all-zero one for a bare folder, as ``model_inputs`` gives;
and SDXL's added conditions, pooled text embeds and ``time_ids``) built from the
standard diffusers block types (``DownBlock2D``, ``ResnetDownsampleBlock2D``,
``AttnDownBlock2D``, ``CrossAttnDownBlock2D``, their up counterparts,
``UNetMidBlock2D`` and ``UNetMidBlock2DCrossAttn``): every ADM, DDPM and Stable
Diffusion 1.x/2.x/XL U-Net. Anything else (score-SDE skip blocks, K-diffusion
blocks, image-conditioned U-Nets) is reported by ``unsupported_reason`` and
``feature_forward`` falls back to hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from diffeat.errors import DiffeatError, ModelError
from diffeat.models.blocks import (
    block_modules,
    capture_blocks,
    check_blocks,
    model_inputs,
)

logger = logging.getLogger(__name__)

# Block types whose forward is "for each layer: [cat skip,] resnet, [attention]; then the resampler".
_DOWN_TYPES = {"DownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"}
_UP_TYPES = {"UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"}
_MID_TYPES = {"UNetMidBlock2D", "UNetMidBlock2DCrossAttn"}
_UNET_TYPES = {"UNet2DModel", "UNet2DConditionModel"}

# Step kinds (ints, so a compiled graph specialises on plain constants).
_CONV_IN, _DOWN_LAYER, _DOWNSAMPLE, _MID, _UP_LAYER = range(5)


def _is_resnet_block(module: nn.Module) -> bool:
    # A resnet resampler takes the time embedding; a conv Downsample2D/Upsample2D does not.
    return type(module).__name__ == "ResnetBlock2D"


def _cross(level: nn.Module) -> bool:
    return bool(getattr(level, "has_cross_attention", False))


def unsupported_reason(unet: nn.Module) -> str | None:
    """Why ``TruncatedUNet`` cannot run ``unet`` (None when it can)."""
    kind = type(unet).__name__
    if kind not in _UNET_TYPES:
        return f"{kind} is not a UNet2DModel or UNet2DConditionModel"
    config = unet.config
    if getattr(unet, "class_embedding", None) is not None:
        return "it has a class embedding (class-conditional models are not supported for features)"
    if kind == "UNet2DConditionModel":
        if config.addition_embed_type not in (None, "text", "text_time"):
            return f"addition_embed_type={config.addition_embed_type!r} needs added conditions"
        if getattr(unet, "encoder_hid_proj", None) is not None and config.encoder_hid_dim_type != "text_proj":
            return f"encoder_hid_dim_type={config.encoder_hid_dim_type!r} needs image embeddings"
        if getattr(unet, "position_net", None) is not None:
            return "GLIGEN position net"
    if type(unet.mid_block).__name__ not in _MID_TYPES:
        return f"mid block type {type(unet.mid_block).__name__}"
    for side, levels, types, samplers in (("down", unet.down_blocks, _DOWN_TYPES, "downsamplers"),
                                          ("up", unet.up_blocks, _UP_TYPES, "upsamplers")):
        for level in levels:
            name = type(level).__name__
            if name not in types:
                return f"{side} block type {name}"
            if any(not _is_resnet_block(r) for r in level.resnets):
                return f"{name} has non-ResnetBlock2D layers"
            sampler = getattr(level, samplers)
            if sampler is not None and len(sampler) != 1:
                return f"{name} has {len(sampler)} {samplers}"
            if side == "up" and all(getattr(level, k, None) for k in ("s1", "s2", "b1", "b2")):
                return "FreeU is enabled"
    return None


def _steps(unet: nn.Module) -> list[tuple[str, int, tuple[nn.Module | None, ...], bool]]:
    """``(block module name, kind, modules, cross)`` for every block, in the paper's order.

    ``modules`` is what the step runs: (conv_in,), (resnet, attention or None),
    (downsampler,), (mid_block,) or (resnet, attention or None, upsampler or None).
    """
    steps: list[tuple[str, int, tuple[nn.Module | None, ...], bool]] = [("conv_in", _CONV_IN, (unet.conv_in,), False)]
    for d, level in enumerate(unet.down_blocks):
        attns = list(level.attentions) if getattr(level, "attentions", None) else []
        for slot, resnet in enumerate(level.resnets):
            attn = attns[slot] if attns else None
            name = f"down_blocks.{d}.{'attentions' if attn is not None else 'resnets'}.{slot}"
            steps.append((name, _DOWN_LAYER, (resnet, attn), _cross(level)))
        if level.downsamplers is not None:
            steps.append((f"down_blocks.{d}.downsamplers.0", _DOWNSAMPLE, (level.downsamplers[0],), False))
    steps.append(("mid_block", _MID, (unet.mid_block,), _cross(unet.mid_block)))
    for u, level in enumerate(unet.up_blocks):
        attns = list(level.attentions) if getattr(level, "attentions", None) else []
        last = len(level.resnets) - 1
        for slot, resnet in enumerate(level.resnets):
            attn = attns[slot] if attns else None
            up = level.upsamplers[0] if slot == last and level.upsamplers is not None else None
            name = (f"up_blocks.{u}" if slot == last
                    else f"up_blocks.{u}.{'attentions' if attn is not None else 'resnets'}.{slot}")
            steps.append((name, _UP_LAYER, (resnet, attn, up), _cross(level)))
    return steps


class TruncatedUNet(nn.Module):
    """``unet`` as a plain module returning ``{block: activation}`` for ``blocks``, stopping after the deepest.

    ``compilable``: ``torch.compile`` traces it into one graph (``HookedForward`` is not).

    Built once per (model, blocks); call it as ``fwd(x, t)`` with ``t`` an int, a
    0-d tensor or one timestep per sample. ``UNet2DConditionModel`` gets all-zero
    ``encoder_hidden_states`` (one token) unless they are passed.
    """

    def __init__(self, unet: nn.Module, blocks: Sequence[int]):
        super().__init__()
        reason = unsupported_reason(unet)
        if reason is not None:
            raise ModelError(f"no truncated forward for this U-Net: {reason}")
        model_inputs(unet, 1, "cpu", torch.float32)  # refuses class-conditional models, as extraction does
        table = block_modules(unet)
        if not blocks:
            raise DiffeatError("no block requested")
        check_blocks(list(blocks), len(table))
        steps = _steps(unet)
        if [s[0] for s in steps] != [m for m, _ in table]:
            raise ModelError("internal: the truncated forward's layers do not match the block table")
        self.unet = unet
        self.blocks = tuple(sorted(set(blocks)))
        self.deepest = self.blocks[-1]
        self.conditional = type(unet).__name__ == "UNet2DConditionModel"
        n_in = [m for m, _ in table].index("mid_block")  # input blocks = skips pushed on the down path
        n_up_layers = sum(len(level.resnets) for level in unet.up_blocks)
        if n_up_layers != n_in:
            raise ModelError(f"internal: {n_up_layers} up layers for {n_in} skip activations")
        # Output block m (0-based) pops skip n_in-1-m; executed up layers reach m_max, so
        # skips below n_in-1-m_max are never popped and need not be kept.
        m_max = self.deepest - n_in - 2
        first_kept = n_in - 1 - m_max if m_max >= 0 else n_in
        wanted = set(self.blocks)
        self._steps = [
            (kind, modules, cross, i + 1 in wanted, i < n_in and i >= first_kept)
            for i, (_name, kind, modules, cross) in enumerate(steps[: self.deepest])
        ]
        self.kept_skips = max(0, n_in - first_kept)
        self.modules_run = [name for name, *_ in steps[: self.deepest]]
        self._up_factor = 2 ** sum(1 for level in unet.up_blocks if level.upsamplers is not None)
        dim = getattr(unet.config, "cross_attention_dim", None)
        self._cross_dim = (dim[0] if isinstance(dim, (list, tuple)) else dim) if self.conditional else None

    compilable = True

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, steps={len(self._steps)}, kept_skips={self.kept_skips}"

    def _embed(self, sample: torch.Tensor, timestep: int | torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               added_cond_kwargs: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The time embedding (and processed text conditioning), exactly as the U-Net's forward computes them."""
        unet = self.unet
        if self.conditional:
            if encoder_hidden_states is None:
                encoder_hidden_states = sample.new_zeros(sample.shape[0], 1, self._cross_dim)
            t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
            emb = unet.time_embedding(t_emb, None)
            added_cond_kwargs = added_cond_kwargs or {}
            aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
            emb = emb + aug if aug is not None else emb
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            encoder_hidden_states = unet.process_encoder_hidden_states(
                encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
            return emb, encoder_hidden_states
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        # UNet2DModel casts to its parameter dtype (conv_in's: every parameter has the same dtype).
        t_emb = unet.time_proj(timesteps).to(dtype=unet.conv_in.weight.dtype)
        return unet.time_embedding(t_emb), None

    @staticmethod
    def _attend(attn: nn.Module, h: torch.Tensor, cross: bool, ehs: torch.Tensor | None) -> torch.Tensor:
        if cross:  # Transformer2DModel: text cross-attention, returns a tuple
            return attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
        return attn(h)

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                added_cond_kwargs: dict | None = None) -> dict[int, torch.Tensor]:
        """The requested blocks' activations of ``sample`` at ``timestep``.

        ``encoder_hidden_states`` (default: all zeros, one token) and ``added_cond_kwargs``
        (SDXL: ``text_embeds`` and ``time_ids``) are passed as to the U-Net's own forward.
        """
        if sample.shape[-1] % self._up_factor or sample.shape[-2] % self._up_factor:
            raise DiffeatError(f"input {tuple(sample.shape[-2:])} is not a multiple of {self._up_factor}: "
                               "this U-Net cannot take it (see --resolution)")
        if self.unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb, ehs = self._embed(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        out: dict[int, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        h = sample
        for index, (kind, modules, cross, capture, keep) in enumerate(self._steps, start=1):
            if kind == _CONV_IN:
                h = modules[0](h)
            elif kind == _DOWN_LAYER:
                h = modules[0](h, emb)
                if modules[1] is not None:
                    h = self._attend(modules[1], h, cross, ehs)
            elif kind == _DOWNSAMPLE:
                h = modules[0](h, emb) if _is_resnet_block(modules[0]) else modules[0](h)
            elif kind == _MID:
                h = modules[0](h, emb, encoder_hidden_states=ehs) if cross else modules[0](h, emb)
            else:  # _UP_LAYER
                h = torch.cat([h, skips.pop()], dim=1)
                h = modules[0](h, emb)
                if modules[1] is not None:
                    h = self._attend(modules[1], h, cross, ehs)
                if modules[2] is not None:
                    h = modules[2](h, emb) if _is_resnet_block(modules[2]) else modules[2](h)
            if keep:
                skips.append(h)
            if capture:
                out[index] = h
        return out


class HookedForward(nn.Module):
    """The fallback for U-Nets ``TruncatedUNet`` does not know: ``capture_blocks`` (hooks, early exit)."""

    compilable = False  # the exception that stops it is a graph break; hooks are opaque to torch.compile

    def __init__(self, unet: nn.Module, blocks: Sequence[int]):
        super().__init__()
        check_blocks(list(blocks), len(block_modules(unet)))
        self.unet, self.blocks = unet, tuple(sorted(set(blocks)))

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor, **inputs: object) -> dict[int, torch.Tensor]:
        """The requested blocks' activations (see ``capture_blocks``); ``inputs`` go to the U-Net."""
        return capture_blocks(self.unet, sample, timestep, self.blocks, **inputs)


def feature_forward(unet: nn.Module, blocks: Sequence[int]) -> nn.Module:
    """The fastest forward diffeat has for ``unet`` and ``blocks``: ``TruncatedUNet``, else hooks.

    The result is called as ``fwd(x, t)`` and returns ``{block: activation}``.
    """
    reason = unsupported_reason(unet)
    if reason is None:
        return TruncatedUNet(unet, blocks)
    logger.warning("using the hook-based forward (slower, not compilable): %s", reason)
    return HookedForward(unet, blocks)
