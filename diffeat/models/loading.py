"""Load a frozen pretrained diffusion model from what a user names with ``--model``.

A model spec is one of:

* a local diffusers folder: a ``UNet2DModel`` / ``UNet2DConditionModel`` folder
  (``config.json`` + weights), or a pipeline folder (``model_index.json`` and one subfolder per
  component: ``unet/`` or ``transformer/``, and for latent models ``vae/``, ``scheduler/`` and the
  text encoders); a bare transformer folder inside a pipeline folder means that pipeline;
* a built-in name (weights shipped with the package, see ``BUILTIN_MODELS``);
* ``random:<arch>``: an architecture of a family (``random_architectures()``: the pixel U-Nets'
  ``ARCHITECTURES``, ``sd15-unet``, ``dit-xl2``, ``tiny-sd``, ...) with seeded random weights, for
  tests and benchmarks (features of a random model are not useful); ``device="meta"`` builds it
  without memory where only shapes matter (block tables, FLOP counts);
* a transformers vision backbone folder (``config.json`` with a ``model_type``, weights,
  ``preprocessor_config.json``): ResNet, ConvNeXt, ViT, DINOv2, CLIP's vision tower;
* a Hugging Face hub id, only if it is already in the local cache.

The folder decides the *family* (``diffeat.models.families``): pixel U-Nets, latent U-Nets
(Stable Diffusion 1.x/2.x/XL), DiT, PixArt, SD3, vision backbones. Nothing is ever downloaded. Weights load from
safetensors or with ``torch.load(weights_only=True)`` (the libraries' own loaders), never an open
pickle, and strictly: a missing or unexpected weight is an error naming it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffeat.errors import ModelError
from diffeat.models.components import declared, read_model_index, weights_sha256
from diffeat.models.families import (
    FAMILIES,
    family_for,
    random_architectures,
    supported_families,
)
from diffeat.models.families.base import FeatureModel, ModelFamily
from diffeat.models.families.pixel_unet import (
    ARCHITECTURES,
    PixelUNet,
    build_random,
    load_unet,
)
from diffeat.models.families.vision import check_folder, is_vision_config
from diffeat.models.json_files import read_json
from diffeat.runtime.checks import check_choice
from diffeat.store.layout import is_hub_id, model_store_name, safe_name

__all__ = ["ARCHITECTURES", "BUILTIN_MODELS", "LoadedModel", "build_random", "load_model", "peek_family",
           "safe_name", "weights_sha256"]

logger = logging.getLogger(__name__)

#: Built-in pretrained models shipped as package data: name -> folder under diffeat/weights/.
BUILTIN_MODELS: dict[str, str] = {"digits-ddpm": "digits-ddpm"}


@dataclass
class LoadedModel:
    """A frozen model (its ``FeatureModel``: denoiser, VAE, conditioning, schedule) and what identifies it."""

    model: FeatureModel
    name: str  # short, path-safe name used in store paths
    source: str  # what the user passed
    weights_sha256: str  # of the denoiser ("" for a model built on the meta device)

    @property
    def unet(self) -> nn.Module:
        """The denoiser: a U-Net, or the transformer of a transformer family."""
        return self.model.denoiser

    @property
    def family(self) -> str:
        """The family's registry name."""
        return self.model.family

    @property
    def resolution(self) -> int:
        """Native input size in pixels."""
        return self.model.native_resolution

    def describe(self) -> dict:
        """Provenance fields recorded with every feature array (pixel U-Nets: the fields they always had)."""
        out = {
            "name": self.name,
            "source": self.source,
            "class": type(self.unet).__name__,
            "weights_sha256": self.weights_sha256,
            "native_resolution": self.resolution,
        }
        if self.family != "pixel-unet":
            out.update(self.model.describe())
        return out


def _denoiser_name(folder: Path, index: dict) -> tuple[str, str] | None:
    """(component, class) of a pipeline's denoiser: its ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        decl = declared(index, name)
        if decl is not None:
            return name, decl[1]
        config = folder / name / "config.json"
        if config.is_file():
            return name, read_json(config).get("_class_name", "UNet2DModel")
    return None


def _pipeline_family(folder: Path) -> tuple[ModelFamily, dict, str]:
    """(family, model_index.json contents, denoiser class) of a pipeline folder, from its JSON files alone."""
    index = read_model_index(folder) if (folder / "model_index.json").is_file() else {}
    found = _denoiser_name(folder, index)
    if found is None:
        raise ModelError(f"{folder}: the pipeline ({index.get('_class_name', 'no model_index.json')}) has no `unet` or "
                         f"`transformer` component; diffeat supports: {supported_families()}")
    _, class_name = found
    has_vae = declared(index, "vae") is not None or (folder / "vae").is_dir()
    return family_for(class_name, has_vae), index, class_name


def _load_pipeline(folder: Path, dtype: torch.dtype | None) -> FeatureModel:
    """A pipeline folder (``model_index.json``, or at least a ``unet/`` subfolder): its family decides the rest."""
    family, index, class_name = _pipeline_family(folder)
    logger.info("%s: %s family (%s)", folder, family.name, class_name)
    return family.load(folder, index, dtype)


def _load_folder(path: Path, dtype: torch.dtype | None) -> FeatureModel:
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return _load_pipeline(path, dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{path} is not a diffusers model folder: expected {path / 'config.json'} (a UNet2DModel folder), "
            f"{path / 'model_index.json'} (a pipeline folder) or {path / 'unet' / 'config.json'}"
        )
    config = read_json(config_file)
    if is_vision_config(config):  # a transformers folder (model_type, no _class_name): a vision backbone
        return FAMILIES["vision"].load(path, {}, dtype)
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name in FAMILIES["pixel-unet"].denoiser_classes:
        return PixelUNet(load_unet(path, None, dtype))
    if any(class_name in f.denoiser_classes for f in FAMILIES.values()):
        if (path.parent / "model_index.json").is_file():  # transformer/ of a pipeline: the pipeline is meant
            return _load_pipeline(path.parent, dtype)
        family = family_for(class_name, True)
        raise ModelError(f"{path} is a bare {class_name} folder: a {family.name} model also needs its pipeline's "
                         "vae/ and scheduler/ (and text encoders); pass the pipeline folder (with model_index.json)")
    raise ModelError(f"{config_file} describes a {class_name}; diffeat supports: {supported_families()}")


def _random_names() -> str:
    return ", ".join(sorted(random_architectures()))


def _cached_hub_folder(repo_id: str) -> Path:
    """The local snapshot of a hub id in the Hugging Face cache (never downloaded), or a ``ModelError`` saying how."""
    try:
        from huggingface_hub import snapshot_download

        # Read the cache location now, not at import time, so HF_HUB_CACHE set later still counts.
        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:
        raise ModelError(
            f"--model {repo_id!r} is not a local folder, a built-in name "
            f"({', '.join(sorted(BUILTIN_MODELS)) or 'none installed'}), `random:<arch>` "
            f"({_random_names()}), or a hub id in the local Hugging Face cache. "
            "diffeat never downloads weights; fetch them yourself, e.g. "
            f"`huggingface-cli download {repo_id}`, or pass the folder path"
        ) from e


def _load_cached_hub(repo_id: str, dtype: torch.dtype | None) -> FeatureModel:
    return _load_folder(_cached_hub_folder(repo_id), dtype)


def _folder_family(path: Path) -> ModelFamily:
    """The family of a folder from its JSON files alone (no weight is read); a vision folder is checked whole."""
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return _pipeline_family(path)[0]
    config_file = path / "config.json"
    if config_file.is_file():
        config = read_json(config_file)
        if is_vision_config(config):
            check_folder(path, config)
            return FAMILIES["vision"]
        class_name = config.get("_class_name", "UNet2DModel")
        if class_name in FAMILIES["pixel-unet"].denoiser_classes:
            return FAMILIES["pixel-unet"]
        if (path.parent / "model_index.json").is_file():  # transformer/ of a pipeline: the pipeline is meant
            return _folder_family(path.parent)
    _load_folder(path, None)  # anything else: the loader's own one-line error
    raise ModelError(f"internal: {path} loaded without a family")


def peek_family(spec: str) -> ModelFamily:
    """The family of the model ``spec`` names, read from its config files without loading any weight.

    Cheap (JSON files only), so a stage can refuse options that do not fit the model (``--t``
    for a vision backbone, none for a diffusion model), a missing weight file or an unsupported
    ``model_type`` before it reads any data. Raises the loader's one-line errors.
    """
    path = Path(spec).expanduser()
    if spec.startswith("random:"):
        return _random_family(spec.split(":", 1)[1])
    if spec in BUILTIN_MODELS:
        return FAMILIES["pixel-unet"]
    if path.is_dir():
        return _folder_family(path)
    if is_hub_id(spec) and not path.exists():
        return _folder_family(_cached_hub_folder(spec))
    load_model(spec, device="meta")  # the loader's own error for a file or an unknown name
    raise ModelError(f"internal: {spec} has no family")


def _random_family(arch: str) -> ModelFamily:
    """The family that builds ``random:<arch>``, or a one-line error listing the architectures."""
    families = random_architectures()
    check_choice(arch, sorted(families), "random:<arch>", error=ModelError)
    return families[arch]


def build_random_model(arch: str, device: str = "cpu") -> FeatureModel:
    """``random:<arch>`` of any family, with seeded random weights built on ``device`` ("meta": shapes only)."""
    return _random_family(arch).architectures[arch](device)


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    """Load the model named by ``spec`` (see the module docstring), frozen and in eval mode.

    ``device`` only concerns ``random:<arch>``: where its random weights are built ("meta" for
    shapes only: then ``weights_sha256`` is empty). Folders always load on the CPU.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(spec).expanduser()
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        model, name = build_random_model(arch, device), model_store_name(spec)
    elif spec in BUILTIN_MODELS:
        folder = Path(__file__).resolve().parent.parent / "weights" / BUILTIN_MODELS[spec]
        model, name = _load_folder(folder, dtype), spec
    elif path.exists():
        if not path.is_dir():
            raise ModelError(
                f"--model {spec}: is a file; pass a diffusers model folder "
                "(convert guided-diffusion checkpoints first with `diffeat convert-adm`)"
            )
        model, name = _load_folder(path, dtype), model_store_name(spec)
    elif is_hub_id(spec):
        model, name = _load_cached_hub(spec, dtype), model_store_name(spec)
    else:
        raise ModelError(
            f"--model {spec!r}: no such folder, and not a built-in name "
            f"({', '.join(sorted(BUILTIN_MODELS)) or 'none installed'}) or `random:<arch>` "
            f"({_random_names()})"
        )
    denoiser = model.denoiser
    denoiser.eval().requires_grad_(False)
    if dtype is not None:
        denoiser.to(dtype)
    on_meta = any(p.is_meta for p in denoiser.parameters())
    return LoadedModel(model, name, spec, "" if on_meta else weights_sha256(denoiser))
