"""The model-family interface: what diffeat needs from any pretrained diffusion model.

A *family* (one module in this folder, one line in ``FAMILIES``) knows one kind of denoiser and
turns a loaded one into a :class:`FeatureModel`, which gives:

* its **block table**, computed on the meta device (1-based for U-Nets, as in the paper;
  transformers: block 0 = the patch embedding, block N = the output of transformer block N);
* how an **image becomes the model's input** (``encode``: pixels as they are, or latents
  through the pipeline's own VAE) and the shape noise is drawn in (``input_shape``);
* the **conditioning** of an unconditional feature forward, computed once when the model is
  loaded (the empty prompt through the pipeline's own text encoders, DiT's null class label);
* its **noising rule** (``schedule``, from the pipeline's scheduler config);
* a **truncated forward** that stops after the deepest requested block and returns
  ``{block: (N, C, h, w)}``;
* an **identity** (everything besides the denoiser's weights that determines the values: VAE,
  conditioning, schedule, input) for the settings hash and provenance. Pixel U-Nets, the
  first family, add nothing, so stores written before families existed keep their hash.

The ``vision`` family (transformers backbones: the paper's ResNet and ViT baselines) has the same
interface without the diffusion parts: no schedule (``schedule is None``, the family's
``timestep`` is False), its own image ``preprocessing``, blocks 0 (stem) .. depth.

A family also lists its ``random:<arch>`` architectures (random weights, or on the meta device
where only shapes matter) and the pipeline components it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from diffeat.errors import DiffeatError, ModelError
from diffeat.models.components import Conditioning, LatentEncoder

if TYPE_CHECKING:
    from pathlib import Path

    from diffeat.models.blocks import BlockInfo
    from diffeat.models.preprocessing import ImagePreprocessing
    from diffeat.models.schedules import NoiseSchedule


@runtime_checkable
class FeatureModel(Protocol):
    """One loaded model, as feature extraction sees it (see the module docstring)."""

    family: str  # the registry name: "pixel-unet", "latent-unet", "dit", "pixart", "sd3", "vision"
    denoiser: nn.Module  # the U-Net or transformer (frozen, eval); a vision backbone's network
    schedule: NoiseSchedule | None  # None: the model takes no timestep and no noise (vision backbones)
    #: how an image becomes the model input; None: guided-diffusion's center crop to [-1, 1] (``data.images``)
    preprocessing: ImagePreprocessing | None
    native_resolution: int  # pixels
    first_block: int  # 1 (U-Nets: the paper's numbering) or 0 (transformers: the patch embedding)
    latent: bool  # images go through the VAE

    def check_resolution(self, resolution: int) -> None:
        """Raise a one-line ``DiffeatError`` if the model cannot take ``resolution`` pixels."""

    def check_unconditional(self) -> None:
        """Raise a one-line ``ModelError`` if the model has no unconditional input (a class label it needs)."""

    def input_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the model input for an image of ``resolution`` pixels: the shape noise is drawn in."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, R, R) on the model's device -> the model's clean input x0 (float32)."""

    def block_table(self, resolution: int | None = None) -> list[BlockInfo]:
        """Every block at ``resolution`` pixels (default: native), computed on the meta device."""

    def feature_forward(self, blocks: Sequence[int]) -> nn.Module:
        """``fwd(x_t, t) -> {block: (N, C, h, w)}`` with ``t`` the training timesteps, stopping after the deepest."""

    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's own complete forward with the same conditioning (the reference, and the naive baseline)."""

    def on_meta(self) -> FeatureModel:
        """The same model on the meta device (shapes only: block tables, FLOP counts)."""

    def identity(self, resolution: int | None = None) -> dict:
        """What determines the values besides the denoiser's weights (empty for pixel U-Nets)."""

    def describe(self) -> dict:
        """Provenance fields for the store's attributes."""

    def to(self, device: torch.device | str) -> FeatureModel:
        """Move the denoiser, the VAE and the conditioning to ``device``; returns self."""


@dataclass(frozen=True)
class ModelFamily:
    """A registry entry: the denoiser classes a family handles and how to build its ``FeatureModel``."""

    name: str
    summary: str  # one line for errors and `diffeat blocks`
    denoiser_classes: tuple[str, ...]  # diffusers class names (the pipeline's `unet` or `transformer`)
    latent: bool  # images go through the pipeline's VAE (a pipeline folder with `vae/`)
    #: (pipeline folder, model_index.json contents, dtype) -> FeatureModel
    load: Callable[[Path, dict, torch.dtype | None], FeatureModel]
    #: ``random:<arch>`` name -> builder(device) -> FeatureModel with seeded random weights built on ``device``
    #: ("meta" where only shapes matter: block tables, FLOP counts)
    architectures: dict[str, Callable[[str], FeatureModel]] = field(default_factory=dict)
    #: the model is run on images noised to a timestep t (diffusion models); False: on clean images, no --t
    #: (vision backbones), and its settings carry no t
    timestep: bool = True


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h·w, C) tokens of a patch grid -> an (N, C, h, w) map.

    diffusers' ``PatchEmbed`` flattens the (N, C, h, w) patch map row-major
    (``flatten(2).transpose(1, 2)``): token k is the patch at row k // w, column k % w.
    This is the inverse, so pooling sees patches where they are in the image.
    """
    n, count, c = tokens.shape
    if count != height * width:
        raise ModelError(f"internal: {count} tokens for a {height}x{width} patch grid")
    return tokens.transpose(1, 2).reshape(n, c, height, width)


def check_block_numbers(blocks: Sequence[int], first: int, last: int) -> None:
    """Raise a ``DiffeatError`` naming the valid range if a block does not exist."""
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not first <= b <= last]
    if bad:
        numbering = ("block 0 = the patch embedding, block N = transformer block N" if first == 0
                     else "1-based, as in the paper")
        raise DiffeatError(f"--block {bad[0]} does not exist: this model has blocks {first}..{last} "
                           f"({numbering}; `diffeat blocks --model ...` lists them)")
    if not blocks:
        raise DiffeatError("no block requested")


def block_info(table: Sequence[BlockInfo], block: int) -> BlockInfo:
    """The row of ``table`` for ``block`` (tables start at block 1, or 0 for transformers)."""
    for info in table:
        if info.index == block:
            return info
    check_block_numbers([block], table[0].index, table[-1].index)
    raise ModelError(f"internal: block {block} missing from a table of blocks {table[0].index}..{table[-1].index}")


def check_table_blocks(blocks: Sequence[int], table: Sequence[BlockInfo]) -> None:
    """Refuse blocks the table does not have, naming the valid range (U-Nets: the message they always had)."""
    if table[0].index == 1:
        from diffeat.models.blocks import check_blocks

        check_blocks(list(blocks), len(table))
    else:
        check_block_numbers(list(blocks), table[0].index, table[-1].index)


def default_block(model: FeatureModel, table: Sequence[BlockInfo]) -> int:
    """A mid-depth block: the paper's 24 on ADM-sized pixel U-Nets, the middle block of other U-Nets,
    transformer block depth/2 (14 of DiT-XL/2's 28)."""
    if model.family == "pixel-unet" and len(table) >= 24:
        return 24
    for info in table:
        if info.module == "mid_block":
            return info.index
    return (table[-1].index + 1) // 2


def check_multiple(resolution: int, factor: int, why: str, native: int) -> None:
    """Refuse a resolution that is not a positive multiple of ``factor`` (one line, with the reason)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % factor:
        raise DiffeatError(f"--resolution {resolution} does not fit this model: it must be a positive multiple of "
                           f"{factor} ({why}); its native size is {native}")


class LatentInput(ABC):
    """What the latent families share: images become latents through the pipeline's VAE.

    A subclass sets ``denoiser``, ``vae`` (a ``LatentEncoder``), ``conditioning`` and
    ``native_resolution``, and says by ``_factor()`` how many pixels the input must be a
    multiple of, and why.
    """

    denoiser: nn.Module
    vae: LatentEncoder
    conditioning: Conditioning
    native_resolution: int
    latent = True
    preprocessing = None  # guided-diffusion's center crop to [-1, 1]

    @abstractmethod
    def _factor(self) -> tuple[int, str]:
        """(pixels the input must be a multiple of, why: the VAE's and the denoiser's downsampling)."""

    def check_unconditional(self) -> None:
        """Nothing to do: the family's constructor already refused a model without a null condition."""

    def check_resolution(self, resolution: int) -> None:
        """Pixels must divide into latents (the VAE's factor) that the denoiser can take."""
        factor, why = self._factor()
        check_multiple(resolution, factor, why, self.native_resolution)

    def input_shape(self, resolution: int) -> tuple[int, int, int]:
        """Latents: (latent channels, R / VAE factor, R / VAE factor)."""
        self.check_resolution(resolution)
        side = resolution // self.vae.scale
        return (int(self.denoiser.config.in_channels), side, side)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean (− shift factor) × scaling factor, float32."""
        return self.vae.encode(pixels)

    def to(self, device: torch.device | str) -> LatentInput:
        """Move the denoiser, the VAE and the conditioning."""
        self.denoiser.to(device)
        self.vae.to(device)
        self.conditioning.to(device)
        return self


def build_seeded(device: str, denoiser_class: str, config: dict, vae_config: dict
                 ) -> tuple[nn.Module, LatentEncoder]:
    """A diffusers denoiser and an ``AutoencoderKL`` with seed-0 random weights, built on ``device`` (``random:``)."""
    import diffusers

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        denoiser = getattr(diffusers, denoiser_class)(**config).eval().requires_grad_(False)
        vae = diffusers.AutoencoderKL(**vae_config)
    return denoiser, LatentEncoder(vae)
