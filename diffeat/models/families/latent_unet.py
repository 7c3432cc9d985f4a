"""Latent U-Nets: Stable Diffusion 1.x / 2.x / XL pipeline folders (``UNet2DConditionModel`` + ``vae/``).

* blocks: the same 1-based numbering as pixel U-Nets (the original LDM/SD code has the same flat
  ``input_blocks`` / ``middle_block`` / ``output_blocks`` list: 25 blocks for SD 1.x/2.x, 19 for SD-XL),
  in latent space: SD-1.5 at 512 px runs on 64×64 latents;
* input: the pipeline's VAE, posterior mean × ``scaling_factor`` (``components.LatentEncoder``);
* conditioning: the empty prompt through the pipeline's own text encoder(s), computed once when
  the model loads, exactly as the pipeline's ``encode_prompt("")`` (SD 1.x/2.x: the last hidden
  state of ``text_encoder``; SD-XL: ``hidden_states[-2]`` of both encoders concatenated, the pooled
  projection of ``text_encoder_2`` and ``add_time_ids`` = (R, R, 0, 0, R, R) for resolution R);
* noise: ``scheduler/scheduler_config.json`` (``scaled_linear`` 0.00085…0.012 for every SD);
* truncated forward: ``TruncatedUNet`` with the conditioning bound, SD-XL's added conditions included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.models.components import (
    Conditioning,
    LatentEncoder,
    check_components,
    clip_prompt,
    declared,
    load_component,
    load_vae,
    random_conditioning,
)
from diffeat.models.families.base import LatentInput, ModelFamily, build_seeded
from diffeat.models.schedules import NoiseSchedule, read_schedule, schedule_from_config

logger = logging.getLogger(__name__)

#: Stable Diffusion's VAE (also DiT's: sd-vae-ft-ema): 8x downsampling, 4 latent channels.
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
#: A CPU-sized VAE with the same 8x downsampling.
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=64,
    block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
#: SD-1.5's scheduler config (every SD 1.x/2.x/XL has this training schedule).
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)

#: ``random:<arch>``: (U-Net config, VAE config, text conditioning shapes), random weights.
ARCHITECTURES: dict[str, tuple[dict, dict, dict[str, tuple[int, ...]]]] = {
    # SD-1.5's U-Net (859.5M parameters) at 512 px: what `diffeat bench` measures.
    "sd15-unet": (dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ), SD_VAE, {"encoder_hidden_states": (1, 77, 768)}),
    # SD-2.1's U-Net (stabilityai/stable-diffusion-2-1, 865.9M parameters) at 768 px: DIFT's default model.
    "sd21-unet": (dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        upcast_attention=True, norm_num_groups=32,
    ), SD_VAE, {"encoder_hidden_states": (1, 77, 1024)}),
    # SD-XL base's U-Net (2.57B parameters) at 1024 px.
    "sdxl-unet": (dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True, norm_num_groups=32,
    ), {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
        {"encoder_hidden_states": (1, 77, 2048), "text_embeds": (1, 1280)}),
    # SD-1.x layout at toy size: 64 px images, 8x8 latents, 9 blocks.
    "tiny-sd": (dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ), TINY_VAE, {"encoder_hidden_states": (1, 8, 16)}),
    # SD-XL layout at toy size: added text/time conditions, two encoders' embeddings concatenated.
    "tiny-sdxl": (dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8,
    ), TINY_VAE, {"encoder_hidden_states": (1, 8, 32), "text_embeds": (1, 16)}),
}


def sdxl_time_ids(sample: torch.Tensor, scale: int, dtype: torch.dtype) -> torch.Tensor:
    """SD-XL's ``add_time_ids`` for latents ``sample``: (H, W, 0, 0, H, W) in pixels, one row per sample.

    original size = target size = the image, crop = (0, 0): an uncropped image, as the pipeline's
    ``_get_add_time_ids(original_size, crops_coords_top_left, target_size)`` builds it by default.
    """
    h, w = sample.shape[-2] * scale, sample.shape[-1] * scale
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=sample.device).expand(sample.shape[0], -1)


class ConditionedUNet(nn.Module):
    """A truncated U-Net forward with a latent U-Net's null conditioning bound: ``fwd(x_t, t)``.

    The conditioning tensors are buffers (they move with ``.to(device)``) expanded to the batch
    at each call. SD-XL's ``time_ids`` come from the input size: (R, R, 0, 0, R, R) with
    R = latent size × the VAE's factor, as the pipeline's ``_get_add_time_ids`` builds them for
    an uncropped R×R image.
    """

    def __init__(self, inner: nn.Module, conditioning: Conditioning, time_ids_scale: int | None):
        super().__init__()
        self.inner = inner
        self.unet = inner.unet
        self.blocks = inner.blocks
        self.compilable = inner.compilable
        self.register_buffer("encoder_hidden_states", conditioning.tensors["encoder_hidden_states"], persistent=False)
        text_embeds = conditioning.tensors.get("text_embeds")
        self.register_buffer("text_embeds", text_embeds, persistent=False)
        self.time_ids_scale = time_ids_scale

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> dict[int, torch.Tensor]:
        """The requested blocks of ``sample`` (latents) at training timesteps ``timestep``."""
        b = sample.shape[0]
        ehs = self.encoder_hidden_states.expand(b, -1, -1)
        added = None
        if self.time_ids_scale is not None:
            added = {"text_embeds": self.text_embeds.expand(b, -1),
                     "time_ids": sdxl_time_ids(sample, self.time_ids_scale, ehs.dtype)}
        return self.inner(sample, timestep, encoder_hidden_states=ehs, added_cond_kwargs=added)


class LatentUNet(LatentInput):
    """A Stable Diffusion U-Net with its VAE and null conditioning as a ``FeatureModel``."""

    family = "latent-unet"
    first_block = 1

    def __init__(self, unet: nn.Module, vae: LatentEncoder, conditioning: Conditioning, schedule: NoiseSchedule):
        self.denoiser, self.vae, self.conditioning, self.schedule = unet, vae, conditioning, schedule
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if not getattr(unet.config, "cross_attention_dim", None):
            raise ModelError("a latent U-Net pipeline needs a text-conditioned UNet2DConditionModel")
        if getattr(unet.config, "num_class_embeds", None):
            raise ModelError(f"this U-Net is class-conditional (num_class_embeds={unet.config.num_class_embeds}) "
                             "without a null label; diffeat extracts features from unconditional forwards only")
        size = unet.config.sample_size
        self.native_resolution = int(size[0] if isinstance(size, (list, tuple)) else size) * vae.scale
        self._unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)

    def _factor(self) -> tuple[int, str]:
        # latents the U-Net halves cleanly at every level
        return (self.vae.scale * self._unet_factor,
                f"the VAE downsamples {self.vae.scale}x and the U-Net {self._unet_factor}x more")

    def meta_inputs(self) -> dict:
        """The forward's conditioning on the meta device, batch 1 (block tables, FLOP counts)."""
        meta = self.conditioning.on_meta().tensors
        inputs: dict = {"encoder_hidden_states": meta["encoder_hidden_states"]}
        if self.sdxl:
            inputs["added_cond_kwargs"] = {"text_embeds": meta["text_embeds"],
                                           "time_ids": torch.zeros(1, 6, device="meta")}
        return inputs

    def block_table(self, resolution: int | None = None) -> list:
        """The U-Net's blocks at ``resolution`` pixels (shapes in latent space), on the meta device."""
        from diffeat.models.blocks import block_table

        resolution = resolution or self.native_resolution
        self.check_resolution(resolution)
        return block_table(self.denoiser, resolution // self.vae.scale, inputs=self.meta_inputs())

    def feature_forward(self, blocks: Sequence[int]) -> nn.Module:
        """``TruncatedUNet`` (SD-XL's added conditions included) with the null conditioning bound."""
        from diffeat.models.truncated import feature_forward

        return ConditionedUNet(feature_forward(self.denoiser, blocks), self.conditioning,
                               self.vae.scale if self.sdxl else None)

    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The U-Net's own forward with the null conditioning (SD-XL: added conditions included)."""
        cond = self.conditioning.expanded(x.shape[0])
        added = None
        if self.sdxl:
            added = {"text_embeds": cond["text_embeds"],
                     "time_ids": sdxl_time_ids(x, self.vae.scale, cond["encoder_hidden_states"].dtype)}
        return self.denoiser(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                             added_cond_kwargs=added).sample

    def on_meta(self) -> LatentUNet:
        """The same model (U-Net, VAE, conditioning shapes) on the meta device."""
        from diffeat.models.blocks import meta_copy

        return LatentUNet(meta_copy(self.denoiser), self.vae.on_meta(), self.conditioning.on_meta(), self.schedule)

    def identity(self, resolution: int | None = None) -> dict:
        """Family, VAE, conditioning (SD-XL: with the time ids of ``resolution``) and schedule."""
        cond = dict(self.conditioning.identity)
        if self.sdxl:
            r = resolution or self.native_resolution
            cond["time_ids"] = [r, r, 0, 0, r, r]
        return {"family": self.family, "input": "latents", "vae": self.vae.identity, "conditioning": cond,
                "schedule": self.schedule.describe()}

    def describe(self) -> dict:
        """Provenance."""
        return {"family": self.family, "vae": self.vae.identity, "conditioning": self.conditioning.identity,
                "schedule": self.schedule.as_dict(), "sdxl": self.sdxl}


def _is_sdxl(folder: Path) -> bool:
    config = folder / "unet" / "config.json"
    try:
        return json.loads(config.read_text()).get("addition_embed_type") == "text_time"
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {config}: {e}") from e


def empty_prompt(folder: Path, index: dict, sdxl: bool) -> Conditioning:
    """The empty prompt through the pipeline's text encoder(s), as its ``encode_prompt("")`` computes it."""
    if not sdxl:
        tokenizer, encoder = (load_component(folder, index, n) for n in ("tokenizer", "text_encoder"))
        hidden, _, ident = clip_prompt(tokenizer, encoder, penultimate=False)
        return Conditioning({"encoder_hidden_states": hidden},
                            {"rule": "empty prompt '' as StableDiffusionPipeline.encode_prompt",
                             "pipeline": index.get("_class_name"), "encoders": [ident]})
    names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    if declared(index, "text_encoder") is None and not (folder / "text_encoder").is_dir():
        names = names[1:]  # SD-XL refiner: only the second encoder
    hiddens, pooled, idents = [], None, []
    for tok_name, enc_name in names:
        tokenizer, encoder = load_component(folder, index, tok_name), load_component(folder, index, enc_name)
        hidden, pool, ident = clip_prompt(tokenizer, encoder, penultimate=True)
        hiddens.append(hidden)
        idents.append(ident)
        pooled = pool if pooled is None else pooled
        del encoder
    if pooled is None:
        raise ModelError(f"{folder}: no text encoder of this SD-XL pipeline gives a pooled projection "
                         "(text_encoder_2 must be a CLIPTextModelWithProjection)")
    return Conditioning({"encoder_hidden_states": torch.cat(hiddens, dim=-1), "text_embeds": pooled},
                        {"rule": "empty prompt '' as StableDiffusionXLPipeline.encode_prompt (hidden_states[-2], "
                                 "pooled text_embeds, time_ids (R, R, 0, 0, R, R))",
                         "pipeline": index.get("_class_name"), "encoders": idents})


def _load(folder: Path, index: dict, dtype: torch.dtype | None) -> LatentUNet:
    from diffeat.models.families.pixel_unet import load_unet

    sdxl = _is_sdxl(folder)
    needed = ("unet", "vae", "scheduler")
    if not sdxl:
        needed += ("text_encoder", "tokenizer")
    elif declared(index, "text_encoder") is not None or (folder / "text_encoder").is_dir():
        needed += ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    else:
        needed += ("text_encoder_2", "tokenizer_2")
    check_components(folder, index, needed, "latent-unet (Stable Diffusion)")
    schedule = read_schedule(folder, required=True)
    unet = load_unet(folder, "unet", dtype)
    return LatentUNet(unet, load_vae(folder, index), empty_prompt(folder, index, sdxl), schedule)


def _random(arch: str):
    unet_config, vae_config, cond_shapes = ARCHITECTURES[arch]

    def build(device: str) -> LatentUNet:
        unet, vae = build_seeded(device, "UNet2DConditionModel", unet_config, vae_config)
        schedule = schedule_from_config(SD_SCHEDULE, source=f"random:{arch}: Stable Diffusion's scheduler config")
        return LatentUNet(unet, vae, random_conditioning(cond_shapes, arch, device=device), schedule)

    return build


FAMILY = ModelFamily(
    name="latent-unet",
    summary="latent U-Nets: Stable Diffusion 1.x/2.x/XL pipeline folders (UNet2DConditionModel + vae/)",
    denoiser_classes=("UNet2DConditionModel",),
    latent=True,
    load=_load,
    architectures={arch: _random(arch) for arch in ARCHITECTURES},
)
