"""Stable Diffusion 3 / 3.5: MM-DiT latent transformers trained by flow matching (``SD3Transformer2DModel`` pipelines).

* blocks: 0 = patch embedding, N = the image stream after joint block N (SD3-medium: 0..24);
* input: the pipeline's 16-channel VAE: (posterior mean − shift_factor) × scaling_factor;
* conditioning: the empty prompt through the pipeline's three encoders, computed once at load, as
  ``StableDiffusion3Pipeline.encode_prompt("")``: ``hidden_states[-2]`` of both CLIPs concatenated and
  zero-padded to T5's width, followed by T5's 256 tokens (zeros when the pipeline has no
  ``text_encoder_3``, as the pipeline does), and both CLIPs' pooled projections concatenated;
* noise: flow matching, x_t = (1−σ)·x0 + σ·ε with the scheduler's ``shift`` (3.0 for SD3): ``--t`` in
  0..999 is σ = shift·s/(1+(shift−1)·s), s = (t+1)/1000, and the transformer is given σ·1000
  (``diffeat.models.schedules``).

FLUX (``FluxTransformer2DModel``) is not a family yet: its pipeline packs 2×2 latent patches into
tokens itself, runs two kinds of blocks (dual-stream, then single-stream over text and image tokens),
needs rotary position ids built by the pipeline, a guidance embedding for the distilled models, and
a shift that depends on the image's token count (``use_dynamic_shifting``), which
``schedule_from_config`` refuses. Each is doable within this interface; together they are a
family of their own, left for later.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from diffeat.errors import ModelError
from diffeat.models.components import (
    Conditioning,
    check_components,
    clip_prompt,
    declared,
    load_component,
    load_vae,
    random_conditioning,
    t5_prompt,
)
from diffeat.models.families.base import ModelFamily, build_seeded
from diffeat.models.families.latent_unet import TINY_VAE
from diffeat.models.families.transformer_base import (
    LatentTransformer,
    TruncatedTransformer,
)
from diffeat.models.schedules import read_schedule, schedule_from_config

#: ``StableDiffusion3Pipeline.encode_prompt``'s default T5 length.
T5_LENGTH = 256

#: ``random:<arch>``: (transformer config, VAE config, text conditioning shapes).
ARCHITECTURES: dict[str, tuple[dict, dict, dict[str, tuple[int, ...]]]] = {
    # SD3-medium's MM-DiT (stabilityai/stable-diffusion-3-medium-diffusers) at 1024 px, with its 16-channel VAE.
    "sd3-medium": (dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
                   dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32,
                        sample_size=1024, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
                   {"encoder_hidden_states": (1, 77 + T5_LENGTH, 4096), "pooled_projections": (1, 2048)}),
    "tiny-sd3": (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                      pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16),
                 {**TINY_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
                  "use_post_quant_conv": False},
                 {"encoder_hidden_states": (1, 8, 32), "pooled_projections": (1, 32)}),
}


class TruncatedSD3(TruncatedTransformer):
    """SD3's forward, block by block: the joint blocks update both streams; features are the image stream."""

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Patch tokens, the time+pooled-text embedding and the projected context, as the model's forward."""
        model, cond = self.unet, self.conditioning(sample.shape[0])
        hidden = model.pos_embed(sample).contiguous()
        temb = model.time_text_embed(timestep, cond["pooled_projections"])
        return hidden, {"temb": temb, "encoder_hidden_states": model.context_embedder(cond["encoder_hidden_states"])}

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """``transformer_blocks[index]``; the text stream it returns goes to the next block."""
        ehs, hidden = self.unet.transformer_blocks[index](
            hidden_states=hidden, encoder_hidden_states=ctx["encoder_hidden_states"], temb=ctx["temb"],
            joint_attention_kwargs=None)
        ctx["encoder_hidden_states"] = ehs
        return hidden


class SD3(LatentTransformer):
    """An SD3 pipeline as a ``FeatureModel``."""

    family = "sd3"
    truncated = TruncatedSD3

    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``SD3Transformer2DModel(...)`` with the empty prompt, given σ_t·1000 as the pipeline gives it."""
        cond = self.conditioning.expanded(x.shape[0])
        return self.denoiser(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"],
                             timestep=self.schedule.model_timesteps(t), return_dict=False)[0]

    def check_resolution(self, resolution: int) -> None:
        """Also: the patch grid must fit the learned position embedding (``pos_embed_max_size``)."""
        super().check_resolution(resolution)
        most = getattr(self.denoiser.config, "pos_embed_max_size", None)
        if most and resolution // self.vae.scale // self.patch > most:
            from diffeat.errors import DiffeatError

            raise DiffeatError(f"--resolution {resolution} is too large for this model: its position embedding covers "
                               f"{most}x{most} patches, i.e. at most {most * self.patch * self.vae.scale} px")


def empty_prompt(folder: Path, index: dict, joint_dim: int) -> Conditioning:
    """The empty prompt through the pipeline's CLIP-L, CLIP-G and T5 encoders, as ``encode_prompt("")``."""
    hiddens, pooled, idents = [], [], []
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        hidden, pool, ident = clip_prompt(load_component(folder, index, tok_name),
                                          load_component(folder, index, enc_name), penultimate=True)
        if pool is None:
            raise ModelError(f"{folder}: {enc_name} gives no pooled projection (SD3 needs CLIPTextModelWithProjection)")
        hiddens.append(hidden)
        pooled.append(pool)
        idents.append(ident)
    if declared(index, "text_encoder_3") is None:
        t5 = torch.zeros(1, T5_LENGTH, joint_dim)  # the pipeline's own behaviour without T5
        idents.append({"class": None, "rule": "no text_encoder_3: zeros, as the pipeline"})
    else:
        t5, _, ident = t5_prompt(load_component(folder, index, "tokenizer_3"),
                                 load_component(folder, index, "text_encoder_3"), T5_LENGTH, masked=False)
        idents.append(ident)
    clip = torch.cat(hiddens, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Conditioning({"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                         "pooled_projections": torch.cat(pooled, dim=-1)},
                        {"rule": "empty prompt '' as StableDiffusion3Pipeline.encode_prompt (max_sequence_length 256)",
                         "pipeline": index.get("_class_name"), "encoders": idents})


def _load(folder: Path, index: dict, dtype: torch.dtype | None) -> SD3:
    needed = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    if declared(index, "text_encoder_3") is not None:
        needed += ("text_encoder_3", "tokenizer_3")
    check_components(folder, index, needed, "sd3")
    schedule = read_schedule(folder, required=True)
    transformer = load_component(folder, index, "transformer", dtype=dtype)
    cond = empty_prompt(folder, index, int(transformer.config.joint_attention_dim))
    return SD3(transformer, load_vae(folder, index), cond, schedule)


def _random(arch: str):
    config, vae_config, shapes = ARCHITECTURES[arch]

    def build(device: str) -> SD3:
        transformer, vae = build_seeded(device, "SD3Transformer2DModel", config, vae_config)
        schedule = schedule_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
                                        source=f"random:{arch}: SD3's scheduler config")
        return SD3(transformer, vae, random_conditioning(shapes, arch, device=device), schedule)

    return build


FAMILY = ModelFamily(
    name="sd3",
    summary="Stable Diffusion 3/3.5: flow-matching MM-DiT (SD3Transformer2DModel), empty prompt via CLIP-L/G + T5",
    denoiser_classes=("SD3Transformer2DModel",),
    latent=True,
    load=_load,
    architectures={arch: _random(arch) for arch in ARCHITECTURES},
)
