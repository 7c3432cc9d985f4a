"""What the diffusion-transformer families (DiT, PixArt, SD3) share: numbering, the patch grid, the truncated forward.

* **numbering**: block 0 is the patch embedding (``pos_embed``: patchify convolution plus position
  embedding), block N (1 ≤ N ≤ depth) the output of ``transformer_blocks[N-1]``: DiT-XL/2 has blocks
  0..28. Every block is 1152×16×16 for DiT-XL/2 at 256 px (the width is constant, the grid is the
  latent size over the patch size).
* **the patch grid**: a block's tokens (N, h·w, C) become an (N, C, h, w) map in the order diffusers'
  ``PatchEmbed`` flattened them, row-major (token k = row k // w, column k % w; ``tokens_to_grid``),
  so pooling to k×k pools image regions.
* **truncated forward**: the embedding step of the family's own forward, then the blocks one by
  one with exactly the arguments the model's forward passes, stopping after the deepest requested
  block: the norm-out/projection head and every later block never run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.models.components import Conditioning, LatentEncoder
from diffeat.models.families.base import (
    LatentInput,
    check_block_numbers,
    tokens_to_grid,
)
from diffeat.models.schedules import NoiseSchedule


class TruncatedTransformer(nn.Module, ABC):
    """``fwd(x_t, t) -> {block: (N, C, h, w)}`` for a diffusion transformer, stopping after the deepest block.

    Subclasses give ``embed`` (the model's forward up to its first block: patch embedding, and
    the timestep/conditioning embeddings the blocks take) and ``run_block``. The null
    conditioning is held as buffers and expanded to the batch at each call.
    """

    compilable = True

    def __init__(self, model: nn.Module, blocks: Sequence[int], conditioning: Conditioning,
                 schedule: NoiseSchedule, pixel_scale: int = 8):
        super().__init__()
        depth = len(model.transformer_blocks)
        blocks = sorted(set(blocks))
        check_block_numbers(blocks, 0, depth)
        self.unet = model  # the name every forward of diffeat's has for its network (extract reuses it)
        self.blocks = tuple(blocks)
        self.deepest = self.blocks[-1]
        self.schedule = schedule
        # What the network is given per training timestep (flow matching: σ_t·N), as a buffer: no host
        # copy per call, and a constant for torch.compile. None: t itself (DDPM).
        table = (schedule.model_timesteps(torch.arange(schedule.num_train_timesteps))
                 if schedule.kind == "flow" else None)
        self.register_buffer("model_timesteps", table, persistent=False)
        self.patch = int(model.config.patch_size)
        self.pixel_scale = pixel_scale  # pixels per latent, per side (resolution micro-conditions)
        self._cond_keys = tuple(sorted(conditioning.tensors))
        for key in self._cond_keys:
            self.register_buffer(f"cond_{key}", conditioning.tensors[key], persistent=False)
        self.modules_run = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(self.deepest)]

    def conditioning(self, batch: int) -> dict[str, torch.Tensor]:
        """The null conditioning, expanded to ``batch``."""
        return {k: getattr(self, f"cond_{k}").expand(batch, *getattr(self, f"cond_{k}").shape[1:])
                for k in self._cond_keys}

    @abstractmethod
    def embed(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(patch tokens = block 0, what every block call needs)."""

    @abstractmethod
    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """The image tokens after ``transformer_blocks[index]``; may update ``ctx`` (e.g. SD3's text stream)."""

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> dict[int, torch.Tensor]:
        """The requested blocks of latents ``sample`` at training timesteps ``timestep``."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        if timestep.dim() == 0:
            timestep = timestep[None]
        timestep = timestep.expand(sample.shape[0]).to(sample.device)
        if self.model_timesteps is not None:
            timestep = self.model_timesteps.to(timestep.device)[timestep.long()]
        h, w = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        hidden, ctx = self.embed(sample, timestep)
        out: dict[int, torch.Tensor] = {}
        if 0 in self.blocks:
            out[0] = tokens_to_grid(hidden, h, w)
        for i in range(self.deepest):
            hidden = self.run_block(i, hidden, ctx)
            if i + 1 in self.blocks:
                out[i + 1] = tokens_to_grid(hidden, h, w)
        return out


class LatentTransformer(LatentInput):
    """A diffusion transformer with its VAE and null conditioning as a ``FeatureModel``; one subclass per family."""

    family = ""
    first_block = 0
    truncated: type[TruncatedTransformer] = TruncatedTransformer

    def __init__(self, transformer: nn.Module, vae: LatentEncoder, conditioning: Conditioning,
                 schedule: NoiseSchedule):
        self.denoiser, self.vae, self.conditioning, self.schedule = transformer, vae, conditioning, schedule
        config = transformer.config
        self.patch = int(config.patch_size)
        self.depth = len(transformer.transformer_blocks)
        self.native_resolution = int(config.sample_size) * vae.scale
        if int(config.in_channels) != vae.channels:
            raise ModelError(f"the {type(transformer).__name__} takes {config.in_channels} channels but the VAE "
                             f"gives {vae.channels}: the pipeline's components do not belong together")

    def _factor(self) -> tuple[int, str]:
        # latents that divide into patches
        return (self.vae.scale * self.patch,
                f"the VAE downsamples {self.vae.scale}x and patches are {self.patch}x{self.patch} latents")

    def feature_forward(self, blocks: Sequence[int]) -> nn.Module:
        """The family's ``TruncatedTransformer`` with the null conditioning bound."""
        return self.truncated(self.denoiser, blocks, self.conditioning, self.schedule, self.vae.scale)

    def block_table(self, resolution: int | None = None) -> list:
        """Blocks 0..depth at ``resolution`` pixels: shapes from the truncated forward run on the meta device."""
        from diffeat.models.blocks import BlockInfo, meta_copy

        resolution = resolution or self.native_resolution
        channels, side, _ = self.input_shape(resolution)
        meta = meta_copy(self.denoiser)
        fwd = self.truncated(meta, range(self.depth + 1), self.conditioning.on_meta(), self.schedule, self.vae.scale)
        x = torch.zeros(1, channels, side, side, device="meta")
        with torch.no_grad():
            acts = fwd(x, torch.zeros(1, dtype=torch.long, device="meta"))
        return [BlockInfo(b, "pos_embed" if b == 0 else f"transformer_blocks.{b - 1}", "", int(a.shape[1]),
                          int(a.shape[2]), int(a.shape[3])) for b, a in sorted(acts.items())]

    @abstractmethod
    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The transformer's own forward with the null conditioning (each family passes its arguments)."""

    def on_meta(self) -> LatentTransformer:
        """The same model (transformer, VAE, conditioning shapes) on the meta device."""
        from diffeat.models.blocks import meta_copy

        return type(self)(meta_copy(self.denoiser), self.vae.on_meta(), self.conditioning.on_meta(), self.schedule)

    def identity(self, resolution: int | None = None) -> dict:
        """Family, VAE, conditioning and schedule."""
        return {"family": self.family, "input": "latents", "vae": self.vae.identity,
                "conditioning": dict(self.conditioning.identity), "schedule": self.schedule.describe(),
                "blocks": "0 = patch embedding, N = transformer block N; tokens row-major on the patch grid"}

    def describe(self) -> dict:
        """Provenance."""
        return {"family": self.family, "vae": self.vae.identity, "conditioning": self.conditioning.identity,
                "schedule": self.schedule.as_dict(), "patch_size": self.patch, "depth": self.depth}
