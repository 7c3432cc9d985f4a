"""Load a frozen diffusion U-Net from what a user names with ``--model``.

A model spec is one of:

* a local diffusers folder: a ``UNet2DModel`` / ``UNet2DConditionModel`` folder
  (``config.json`` + weights), or a pipeline folder with a ``unet/`` subfolder;
* a built-in name (weights shipped with the package, see ``BUILTIN_MODELS``);
* ``random:<arch>``: an architecture from ``ARCHITECTURES`` with seeded random
  weights, for tests and benchmarks (features of a random model are not useful);
* a Hugging Face hub id, only if it is already in the local cache.

Nothing is ever downloaded. Weights load from safetensors or with
``torch.load(weights_only=True)`` (diffusers' own loader), never an open pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.runtime.checks import check_choice

logger = logging.getLogger(__name__)

#: Architectures buildable from a config alone (``random:<name>``).
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

#: Built-in pretrained models shipped as package data: name -> folder under diffeat/weights/.
BUILTIN_MODELS: dict[str, str] = {"digits-ddpm": "digits-ddpm"}

_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class LoadedModel:
    """A frozen U-Net and what identifies it."""

    unet: nn.Module
    name: str  # short, path-safe name used in store paths
    source: str  # what the user passed
    weights_sha256: str
    resolution: int  # native input size

    def describe(self) -> dict:
        """Provenance fields recorded with every feature array."""
        return {
            "name": self.name,
            "source": self.source,
            "class": type(self.unet).__name__,
            "weights_sha256": self.weights_sha256,
            "native_resolution": self.resolution,
        }


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order.

    Independent of the file format the weights came from, so a converted checkpoint
    and a re-saved copy have the same identity.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def safe_name(text: str) -> str:
    """A path-safe slug: letters, digits, '.', '_' and '-' only, never '.' or '..'."""
    slug = _NAME_RE.sub("-", text).strip("-.") or "model"
    return slug


def build_random(arch: str, seed: int = 0) -> nn.Module:
    """Build architecture ``arch`` with seeded random weights."""
    from diffusers import UNet2DModel

    check_choice(arch, sorted(ARCHITECTURES), "random:<arch>", error=ModelError)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**ARCHITECTURES[arch])


def _load_folder(path: Path, dtype: torch.dtype | None) -> nn.Module:
    import diffusers

    folder, subfolder = path, None
    if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        subfolder = "unet"
        folder = path
    config_file = folder / (subfolder or "") / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{path} is not a diffusers model folder: expected {path / 'config.json'} (a UNet2DModel folder) "
            f"or {path / 'unet' / 'config.json'} (a pipeline folder)"
        )
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name", "UNet2DModel")
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_file} is not valid JSON: {e}") from e
    if class_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ModelError(f"{config_file} describes a {class_name}; diffeat needs a UNet2DModel or UNet2DConditionModel")
    cls = getattr(diffusers, class_name)
    kwargs = {"local_files_only": True, "low_cpu_mem_usage": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load the U-Net in {folder / (subfolder or '')}: {e}") from e


def _load_cached_hub(repo_id: str, dtype: torch.dtype | None) -> nn.Module:
    try:
        from huggingface_hub import snapshot_download

        # Read the cache location now, not at import time, so HF_HUB_CACHE set later still counts.
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - any failure means "not in the cache"
        raise ModelError(
            f"--model {repo_id!r} is not a local folder, a built-in name "
            f"({', '.join(sorted(BUILTIN_MODELS)) or 'none installed'}), `random:<arch>` "
            f"({', '.join(sorted(ARCHITECTURES))}), or a hub id in the local Hugging Face cache. "
            "diffeat never downloads weights; fetch them yourself, e.g. "
            f"`huggingface-cli download {repo_id}`, or pass the folder path"
        ) from e
    return _load_folder(folder, dtype)


def load_model(spec: str, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the U-Net named by ``spec`` (see the module docstring), frozen and in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(spec).expanduser()
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        unet, name = build_random(arch), f"random-{safe_name(arch)}"
    elif spec in BUILTIN_MODELS:
        folder = Path(__file__).resolve().parent.parent / "weights" / BUILTIN_MODELS[spec]
        unet, name = _load_folder(folder, dtype), spec
    elif path.exists():
        if not path.is_dir():
            raise ModelError(
                f"--model {spec}: is a file; pass a diffusers model folder "
                "(convert guided-diffusion checkpoints first with `diffeat convert-adm`)"
            )
        unet, name = _load_folder(path, dtype), safe_name(path.resolve().name)
    elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        unet, name = _load_cached_hub(spec, dtype), safe_name(spec.replace("/", "--"))
    else:
        raise ModelError(
            f"--model {spec!r}: no such folder, and not a built-in name "
            f"({', '.join(sorted(BUILTIN_MODELS)) or 'none installed'}) or `random:<arch>` "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    unet.eval().requires_grad_(False)
    if dtype is not None:
        unet.to(dtype)
    size = unet.config.sample_size
    resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    return LoadedModel(unet, name, spec, weights_sha256(unet), resolution)
