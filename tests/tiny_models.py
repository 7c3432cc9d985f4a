"""Tiny U-Nets built from configs for tests (beyond diffeat's own ``random:<arch>`` architectures)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def tiny_sd_unet() -> UNet2DConditionModel:
    """A two-level Stable-Diffusion-style conditional U-Net (cross-attention), seeded, on CPU."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
