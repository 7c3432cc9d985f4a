"""Pixel-space U-Nets: converted guided-diffusion (ADM) checkpoints, diffusers ``UNet2DModel`` and bare
``UNet2DConditionModel`` folders. The first family, and exactly what diffeat did before families existed.

* blocks: the paper's 1-based numbering computed from the module structure
  (``diffeat.models.blocks``; block 24 of ADM-256 = ``output_blocks[4]``);
* input: the image itself, in [-1, 1];
* conditioning: none (a bare ``UNet2DConditionModel`` gets an all-zero one-token text conditioning,
  as always; class-conditional models are refused when features are extracted);
* noise: ADM's linear schedule, or the scheduler config of a pipeline folder that has one;
* truncated forward: ``diffeat.models.truncated``;
* identity: adds nothing, so every store written before families existed keeps its settings hash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.models.families.base import ModelFamily
from diffeat.models.json_files import read_json
from diffeat.models.schedules import ADM_LINEAR, NoiseSchedule, read_schedule
from diffeat.runtime.checks import check_choice

logger = logging.getLogger(__name__)

#: Architectures buildable from a config alone (``random:<name>``), as ``UNet2DModel`` keyword arguments.
ARCHITECTURES: dict[str, dict] = {
    # A 1.4M-parameter U-Net with the ADM block types, for tests and CPU demos (13 blocks at 32 px).
    "tiny": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        attention_head_dim=16,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=8,
        norm_num_groups=8,
        downsample_type="resnet",
        upsample_type="resnet",
    ),
    # guided-diffusion's 256x256 unconditional ImageNet model (552.8M parameters, 37 blocks).
    "adm256": dict(
        sample_size=256,
        in_channels=3,
        out_channels=6,
        layers_per_block=2,
        block_out_channels=(256, 256, 512, 512, 1024, 1024),
        down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
        up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3,
        attention_head_dim=64,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=32,
        norm_num_groups=32,
        norm_eps=1e-5,
        downsample_type="resnet",
        upsample_type="resnet",
        flip_sin_to_cos=True,
        freq_shift=0,
    ),
}
# The ADM-256 topology at 1/8 width and 64 px: same 37-block table, CPU-sized.
ARCHITECTURES["mini-adm"] = {
    **ARCHITECTURES["adm256"],
    "sample_size": 64,
    "block_out_channels": (32, 32, 64, 64, 128, 128),
    "attention_head_dim": 16,
}

# The built-in digits-ddpm model's architecture (scripts/train_digits_ddpm.py trains it; `random:digits-ddpm`
# is the same network with seeded random weights, the baseline its features are compared against).
# 8 px: the digits' native resolution (preprocess BOX-halves the 32 px images back to the original 8x8).
ARCHITECTURES["digits-ddpm"] = {
    **ARCHITECTURES["tiny"],
    "sample_size": 8,
    "block_out_channels": (32, 48, 64),
}

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def build_random(arch: str, seed: int = 0, device: str = "cpu") -> nn.Module:
    """Build the ``UNet2DModel`` architecture ``arch`` with seeded random weights, on ``device`` ("meta": shapes only).

    On the CPU these are the weights every earlier version built (the same seed, the same order).
    """
    from diffusers import UNet2DModel

    check_choice(arch, sorted(ARCHITECTURES), "random:<arch>", error=ModelError)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return UNet2DModel(**ARCHITECTURES[arch])


class PixelUNet:
    """A pixel-space U-Net as a ``FeatureModel`` (see the module docstring)."""

    family = "pixel-unet"
    first_block = 1
    latent = False
    preprocessing = None  # guided-diffusion's center crop to [-1, 1]

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule = ADM_LINEAR):
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            raise ModelError("this UNet2DConditionModel is an SD-XL U-Net (added text/time conditions): point "
                             "--model at its pipeline folder (with vae/, text_encoder_2/, ...), not at unet/")
        self.denoiser = unet
        self.schedule = schedule
        size = unet.config.sample_size
        self.native_resolution = int(size[0] if isinstance(size, (list, tuple)) else size)

    def check_resolution(self, resolution: int) -> None:
        """The U-Net must halve the input cleanly at every level."""
        from diffeat.models.blocks import check_resolution

        check_resolution(self.denoiser, resolution)

    def check_unconditional(self) -> None:
        """Class-conditional U-Nets are refused: a label would leak the answer into the features."""
        from diffeat.models.blocks import model_inputs

        model_inputs(self.denoiser, 1, "cpu", torch.float32)

    def input_shape(self, resolution: int) -> tuple[int, int, int]:
        """The image itself: (in_channels, R, R)."""
        return (int(self.denoiser.config.in_channels), resolution, resolution)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels are the model input."""
        return pixels.float()

    def block_table(self, resolution: int | None = None) -> list:
        """The paper's numbering, computed from the module structure (``diffeat.models.blocks``)."""
        from diffeat.models.blocks import block_table

        return block_table(self.denoiser, resolution)

    def feature_forward(self, blocks: Sequence[int]) -> nn.Module:
        """``TruncatedUNet`` (or the hook fallback), called as ``fwd(x_t, t)``."""
        from diffeat.models.truncated import feature_forward

        return feature_forward(self.denoiser, blocks)

    def full_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The U-Net's own forward (a bare conditional U-Net with the all-zero conditioning)."""
        from diffeat.models.blocks import model_inputs

        return self.denoiser(x, t, **model_inputs(self.denoiser, x.shape[0], x.device, x.dtype)).sample

    def on_meta(self) -> PixelUNet:
        """The same U-Net on the meta device."""
        from diffeat.models.blocks import meta_copy

        return PixelUNet(meta_copy(self.denoiser), self.schedule)

    def identity(self, resolution: int | None = None) -> dict:
        """Nothing beyond the U-Net's weights (and the schedule, recorded as ever in the noise settings)."""
        return {}

    def describe(self) -> dict:
        """Provenance: the schedule and where it came from."""
        return {"schedule": self.schedule.as_dict()}

    def to(self, device: torch.device | str) -> PixelUNet:
        """Move the U-Net."""
        self.denoiser.to(device)
        return self


def load_unet(folder: Path, subfolder: str | None, dtype: torch.dtype | None) -> nn.Module:
    """A ``UNet2DModel`` / ``UNet2DConditionModel`` from a diffusers folder, locally and strictly."""
    import diffusers

    from diffeat.models.components import check_loading_info

    config_file = folder / (subfolder or "") / "config.json"
    class_name = read_json(config_file).get("_class_name", "UNet2DModel")
    if class_name not in UNET_CLASSES:
        from diffeat.models.families import supported_families

        raise ModelError(f"{config_file} describes a {class_name}; diffeat supports: {supported_families()}")
    cls = getattr(diffusers, class_name)
    kwargs = {"local_files_only": True, "low_cpu_mem_usage": False, "output_loading_info": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        unet, info = cls.from_pretrained(str(folder), subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load the U-Net in {folder / (subfolder or '')}: {e}") from e
    check_loading_info(folder / (subfolder or ""), class_name, info)
    return unet


def _load(folder: Path, index: dict, dtype: torch.dtype | None) -> PixelUNet:
    """A pipeline folder whose denoiser is a pixel U-Net (``unet/``, no VAE); its scheduler config if it has one."""
    return PixelUNet(load_unet(folder, "unet", dtype), read_schedule(folder, required=False))


def _random(arch: str):
    def build(device: str) -> PixelUNet:
        return PixelUNet(build_random(arch, device=device))

    return build


FAMILY = ModelFamily(
    name="pixel-unet",
    summary="pixel-space U-Nets: converted ADM checkpoints, UNet2DModel, bare UNet2DConditionModel folders",
    denoiser_classes=UNET_CLASSES,
    latent=False,
    load=_load,
    architectures={arch: _random(arch) for arch in ARCHITECTURES},
)
