"""PixArt-α / PixArt-Σ: text-conditioned latent transformers (``PixArtTransformer2DModel`` pipelines).

* blocks: 0 = patch embedding, N = transformer block N (28 blocks of 1152 channels);
* input: the pipeline's VAE, posterior mean × scaling factor;
* conditioning: the empty prompt through the pipeline's T5 encoder, computed once at load, exactly as
  ``encode_prompt("")`` with the pipeline's ``max_sequence_length`` (α: 120 tokens, Σ: 300) and its
  attention mask (only the end-of-sequence token is attended); the 1024-px models (``sample_size`` 128)
  also get the resolution and aspect-ratio micro-conditions of the input size, as the pipeline passes them;
* noise: the pipeline's scheduler config (linear 1e-4…0.02 for the released models), t passed as is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffeat.errors import ModelError
from diffeat.models.components import (
    Conditioning,
    check_components,
    load_component,
    load_vae,
    random_conditioning,
    t5_prompt,
)
from diffeat.models.families.base import ModelFamily, build_seeded
from diffeat.models.families.latent_unet import SD_VAE, TINY_VAE
from diffeat.models.families.transformer_base import (
    LatentTransformer,
    TruncatedTransformer,
)
from diffeat.models.schedules import read_schedule, schedule_from_config

#: The pipelines' default ``max_sequence_length`` of ``encode_prompt``.
MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}

#: ``random:<arch>``: (transformer config, VAE config, text conditioning shapes).
ARCHITECTURES: dict[str, tuple[dict, dict, dict[str, tuple[int, ...]]]] = {
    # PixArt-α XL/2 at 1024 px (PixArt-alpha/PixArt-XL-2-1024-MS: resolution micro-conditions on).
    "pixart-alpha-1024": (dict(sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72,
                               num_attention_heads=16, caption_channels=4096, in_channels=4, cross_attention_dim=1152,
                               out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                               num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                               norm_eps=1e-6),
                          {**SD_VAE, "sample_size": 1024}, {"encoder_hidden_states": (1, 120, 4096)}),
    "tiny-pixart": (dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                         caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8,
                         attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                         norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6),
                    TINY_VAE, {"encoder_hidden_states": (1, 8, 32)}),
}


def micro_conditions(model: torch.nn.Module, sample: torch.Tensor, scale: int, dtype: torch.dtype) -> dict:
    """``added_cond_kwargs`` as the pipeline builds them for latents ``sample``: the image's (H, W) and H/W in
    pixels for models with additional conditions (the 1024-px PixArt-α), else None."""
    if not model.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    b, h, w = sample.shape[0], sample.shape[-2] * scale, sample.shape[-1] * scale
    return {"resolution": torch.tensor([[h, w]], dtype=dtype, device=sample.device).expand(b, -1),
            "aspect_ratio": torch.tensor([[h / w]], dtype=dtype, device=sample.device).expand(b, -1)}


class TruncatedPixArt(TruncatedTransformer):
    """PixArt's forward, block by block (``PixArtTransformer2DModel.forward``'s steps 1 and 2)."""

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Patch tokens, adaLN-single timestep embedding, projected caption and its mask as a bias."""
        model, b = self.unet, sample.shape[0]
        cond = self.conditioning(b)
        hidden = model.pos_embed(sample)
        added = micro_conditions(model, sample, self.pixel_scale, cond["encoder_hidden_states"].dtype)
        t, _ = model.adaln_single(timestep, added, batch_size=b, hidden_dtype=hidden.dtype)
        ehs = cond["encoder_hidden_states"]
        if model.caption_projection is not None:
            ehs = model.caption_projection(ehs).view(b, -1, hidden.shape[-1])
        bias = ((1 - cond["encoder_attention_mask"].to(hidden.dtype)) * -10000.0).unsqueeze(1)
        return hidden, {"timestep": t, "encoder_hidden_states": ehs, "encoder_attention_mask": bias}

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """``transformer_blocks[index]`` with the arguments ``PixArtTransformer2DModel.forward`` passes."""
        return self.unet.transformer_blocks[index](
            hidden, attention_mask=None, encoder_hidden_states=ctx["encoder_hidden_states"],
            encoder_attention_mask=ctx["encoder_attention_mask"], timestep=ctx["timestep"],
            cross_attention_kwargs=None, class_labels=None)


class PixArt(LatentTransformer):
    """A PixArt pipeline as a ``FeatureModel``."""

    family = "pixart"
    truncated = TruncatedPixArt

    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``PixArtTransformer2DModel(...)`` with the empty prompt, its mask and micro-conditions, as the pipeline."""
        cond = self.conditioning.expanded(x.shape[0])
        added = micro_conditions(self.denoiser, x, self.vae.scale, cond["encoder_hidden_states"].dtype)
        return self.denoiser(x, encoder_hidden_states=cond["encoder_hidden_states"],
                             encoder_attention_mask=cond["encoder_attention_mask"], timestep=t,
                             added_cond_kwargs=added, return_dict=False)[0]


def empty_prompt(folder: Path, index: dict) -> Conditioning:
    """The empty prompt through the pipeline's T5 encoder, as ``encode_prompt("")`` computes it."""
    pipeline = index.get("_class_name")
    if pipeline not in MAX_SEQUENCE_LENGTH:
        raise ModelError(f"{folder}: model_index.json names the pipeline {pipeline!r}; diffeat knows the prompt length "
                         f"of {', '.join(f'{k} ({v} tokens)' for k, v in MAX_SEQUENCE_LENGTH.items())}")
    tokenizer, encoder = load_component(folder, index, "tokenizer"), load_component(folder, index, "text_encoder")
    hidden, mask, ident = t5_prompt(tokenizer, encoder, MAX_SEQUENCE_LENGTH[pipeline], masked=True)
    return Conditioning({"encoder_hidden_states": hidden, "encoder_attention_mask": mask},
                        {"rule": f"empty prompt '' as {pipeline}.encode_prompt", "pipeline": pipeline,
                         "encoders": [ident]})


def _load(folder: Path, index: dict, dtype: torch.dtype | None) -> PixArt:
    check_components(folder, index, ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"), "pixart")
    schedule = read_schedule(folder, required=True)
    transformer = load_component(folder, index, "transformer", dtype=dtype)
    return PixArt(transformer, load_vae(folder, index), empty_prompt(folder, index), schedule)


def _random(arch: str):
    config, vae_config, shapes = ARCHITECTURES[arch]

    def build(device: str) -> PixArt:
        transformer, vae = build_seeded(device, "PixArtTransformer2DModel", config, vae_config)
        cond = random_conditioning(shapes, arch, device=device)
        length = shapes["encoder_hidden_states"][1]
        cond.tensors["encoder_attention_mask"] = torch.ones(1, length, dtype=torch.long, device=device)
        schedule = schedule_from_config(dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
                                        source=f"random:{arch}: PixArt's training schedule")
        return PixArt(transformer, vae, cond, schedule)

    return build


FAMILY = ModelFamily(
    name="pixart",
    summary="PixArt-α/Σ: text-conditioned latent transformers (PixArtTransformer2DModel), empty prompt via T5",
    denoiser_classes=("PixArtTransformer2DModel",),
    latent=True,
    load=_load,
    architectures={arch: _random(arch) for arch in ARCHITECTURES},
)
