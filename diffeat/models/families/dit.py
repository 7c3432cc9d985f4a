"""DiT (Peebles & Xie 2023): class-conditional latent diffusion transformers (``DiTTransformer2DModel`` pipelines).

* blocks: 0 = patch embedding, N = transformer block N (DiT-XL/2: 0..28, 1152×16×16 at 256 px);
* input: the pipeline's VAE (sd-vae-ft-ema for the released checkpoints), posterior mean × 0.18215;
* conditioning: the **null class label**, the extra row of the class embedding that classifier-free
  guidance trained (index ``num_embeds_ada_norm`` = 1000 for ImageNet, what ``DiTPipeline`` passes as
  ``class_null``); a model without that row is refused (a real label would leak the answer);
* noise: the pipeline's scheduler config (DiT: linear 1e-4…0.02, 1000 steps), t passed as is;
* DDAE (Xiang et al. 2023) probes DiT-XL/2 at block 13 of 28, t = 81…121.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.models.components import (
    Conditioning,
    check_components,
    load_component,
    load_vae,
)
from diffeat.models.families.base import ModelFamily, build_seeded
from diffeat.models.families.latent_unet import SD_VAE, TINY_VAE
from diffeat.models.families.transformer_base import (
    LatentTransformer,
    TruncatedTransformer,
)
from diffeat.models.schedules import read_schedule, schedule_from_config

#: ``random:<arch>``: (transformer config, VAE config).
ARCHITECTURES: dict[str, tuple[dict, dict]] = {
    # DiT-XL/2 at 256 px (675.1M parameters): what `diffeat bench` measures.
    "dit-xl2": (dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=32, patch_size=2, num_embeds_ada_norm=1000), SD_VAE),
    # The same layout at toy size: 64 px images, 8x8 latents, a 4x4 patch grid, blocks 0..3.
    "tiny-dit": (dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
                      sample_size=8, patch_size=2, num_embeds_ada_norm=10), TINY_VAE),
}
DIT_SCHEDULE = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)


def null_label(transformer: nn.Module) -> int:
    """The classifier-free-guidance label of a DiT (its class embedding's extra row), or a ``ModelError``."""
    embedder = transformer.transformer_blocks[0].norm1.emb.class_embedder
    rows, classes = embedder.embedding_table.num_embeddings, embedder.num_classes
    if rows <= classes:
        raise ModelError(f"this DiTTransformer2DModel is class-conditional without a null label: its class embedding "
                         f"has {rows} rows for {classes} classes (no classifier-free-guidance row); diffeat extracts "
                         "features from unconditional forwards only, and a real label would leak the answer")
    return int(classes)


class TruncatedDiT(TruncatedTransformer):
    """DiT's forward, block by block: ``pos_embed``, then ``block(h, timestep=t, class_labels=null)``."""

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Patch tokens; the blocks embed t and the label themselves (adaLN-Zero)."""
        cond = self.conditioning(sample.shape[0])
        return self.unet.pos_embed(sample), {"timestep": timestep, "class_labels": cond["class_labels"]}

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """``transformer_blocks[index]`` with the arguments ``DiTTransformer2DModel.forward`` passes."""
        return self.unet.transformer_blocks[index](
            hidden, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
            timestep=ctx["timestep"], cross_attention_kwargs=None, class_labels=ctx["class_labels"])


class DiT(LatentTransformer):
    """A DiT pipeline as a ``FeatureModel``."""

    family = "dit"
    truncated = TruncatedDiT

    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``DiTTransformer2DModel(x, timestep=t, class_labels=null)``, as ``DiTPipeline`` calls it."""
        labels = self.conditioning.expanded(x.shape[0])["class_labels"]
        return self.denoiser(x, timestep=t, class_labels=labels, return_dict=False)[0]


def _conditioning(transformer: nn.Module) -> Conditioning:
    label = null_label(transformer)
    device = "meta" if any(p.is_meta for p in transformer.parameters()) else "cpu"
    return Conditioning({"class_labels": torch.tensor([label], dtype=torch.long, device=device)},
                        {"rule": "null class label (classifier-free guidance)", "class_label": label})


def _load(folder: Path, index: dict, dtype: torch.dtype | None) -> DiT:
    check_components(folder, index, ("transformer", "vae", "scheduler"), "dit")
    schedule = read_schedule(folder, required=True)
    transformer = load_component(folder, index, "transformer", dtype=dtype)
    return DiT(transformer, load_vae(folder, index), _conditioning(transformer), schedule)


def _random(arch: str):
    config, vae_config = ARCHITECTURES[arch]

    def build(device: str) -> DiT:
        transformer, vae = build_seeded(device, "DiTTransformer2DModel", config, vae_config)
        schedule = schedule_from_config(DIT_SCHEDULE, source=f"random:{arch}: DiT's training schedule")
        return DiT(transformer, vae, _conditioning(transformer).to(device), schedule)

    return build


FAMILY = ModelFamily(
    name="dit",
    summary="DiT: class-conditional latent transformers (DiTTransformer2DModel), null class label",
    denoiser_classes=("DiTTransformer2DModel",),
    latent=True,
    load=_load,
    architectures={arch: _random(arch) for arch in ARCHITECTURES},
)
