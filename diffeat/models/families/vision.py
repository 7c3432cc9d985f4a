"""Vision backbones from Hugging Face ``transformers``: the paper's baselines (ResNet, ViT) and today's (DINOv2, CLIP).

A folder with a transformers ``config.json`` (``model_type`` resnet, convnext, vit, dinov2,
dinov2_with_registers, clip or clip_vision_model), its weights and its ``preprocessor_config.json``,
or a hub id already in the local cache (``--model facebook/dinov2-small``), or ``random:<arch>``.

* **blocks**: block N is transformers' ``hidden_states[N]``: block 0 is the stem (CNNs: the
  7×7 convolution and max-pool of a ResNet, ConvNeXt's 4×4 patchify) or the patch embedding
  (ViTs, with the position embedding; CLIP: after its ``pre_layrnorm``), block N ≥ 1 the output
  of stage N (CNNs) or transformer layer N (ViTs). Stages and layers are 1-based like the
  paper's U-Net blocks, and the embedding is 0 like the diffusion transformers' patch
  embedding: ResNet-50 has blocks 0..4, ViT-B/16 and DINOv2 ViT-S/14 0..12. The final
  layer norm (``last_hidden_state``) is not a block, as in ``hidden_states``.
* **tokens**: a ViT's tokens are (class, [registers,] patches); the class and register tokens
  are dropped and the patches reshaped row-major to the patch grid (ViT-B/16 at 224 px:
  768×14×14), so ``--pool k`` pools image regions as for every other model.
* **input**: the image preprocessed by the model's own image processor
  (``diffeat.models.preprocessing``: resize, center crop, mean/std of its
  ``preprocessor_config.json``), no noise and **no timestep** (the family's ``timestep`` is
  False; ``schedule`` is None).
* **truncated forward**: the model's embedding modules, then its stages/layers one by one with
  the arguments its own forward passes, stopping after the deepest requested block.
* **identity**: the architecture and the numbering; the preprocessing rule is the settings'
  ``preprocess`` record.

Weights load strictly (``components.check_loading_info``), with the class the config's
``architectures`` names (``ResNetForImageClassification``, ``CLIPModel`` ...) so a hub
checkpoint's every key is accounted for; the backbone is kept, the head dropped.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffeat.errors import DiffeatError, ModelError
from diffeat.models.families.base import ModelFamily, check_block_numbers, tokens_to_grid
from diffeat.models.preprocessing import ImagePreprocessing, from_processor_config, read_processor_config

logger = logging.getLogger(__name__)

#: Weight files a transformers folder may hold (transformers reads .bin with ``weights_only``).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Architecture:
    """How diffeat reads one transformers ``model_type``: where its stem and its stages/layers are."""

    model_type: str
    kind: str  # "cnn" (stages of (N, C, H, W) maps) or "vit" (layers of tokens)
    backbone: str  # the transformers class of the backbone
    #: ``architectures`` entry of a config -> attribute holding the backbone in it ("" = the model itself)
    heads: dict[str, str]
    stem: tuple[str, ...]  # modules run before block 1, in order (their output is block 0)
    layers: tuple[str, ...]  # where the list of stages/layers is (the first path the module has)
    config: str = ""  # a composite config's part for the backbone ("vision_config" of CLIPModel)
    registers: str | None = None  # config field counting register tokens (dropped like the class token)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("resnet", "cnn", "ResNetModel", {"ResNetModel": "", "ResNetForImageClassification": "resnet"},
                 ("embedder",), ("encoder.stages",)),
    Architecture("convnext", "cnn", "ConvNextModel",
                 {"ConvNextModel": "", "ConvNextForImageClassification": "convnext"}, ("embeddings",),
                 ("encoder.stages",)),
    Architecture("vit", "vit", "ViTModel", {"ViTModel": "", "ViTForImageClassification": "vit"}, ("embeddings",),
                 ("layers", "encoder.layer")),
    Architecture("dinov2", "vit", "Dinov2Model", {"Dinov2Model": "", "Dinov2ForImageClassification": "dinov2"},
                 ("embeddings",), ("encoder.layer",)),
    Architecture("dinov2_with_registers", "vit", "Dinov2WithRegistersModel",
                 {"Dinov2WithRegistersModel": "", "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"},
                 ("embeddings",), ("encoder.layer",), registers="num_register_tokens"),
    Architecture("clip_vision_model", "vit", "CLIPVisionModel",
                 {"CLIPVisionModel": "", "CLIPVisionModelWithProjection": "vision_model"},
                 ("embeddings", "pre_layrnorm"), ("encoder.layers",)),
    Architecture("clip", "vit", "CLIPVisionModel", {"CLIPModel": "vision_model"}, ("embeddings", "pre_layrnorm"),
                 ("encoder.layers",), config="vision_config"),
)}

BLOCKS_RULE = ("block N = transformers' hidden_states[N]: 0 = stem / patch embedding, N = stage N (CNNs) or "
               "transformer layer N (ViTs); ViT tokens: class and register tokens dropped, patches row-major on the "
               "patch grid")


def _module(root: nn.Module, path: str) -> nn.Module | None:
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _inner(backbone: nn.Module) -> nn.Module:
    """The module that holds the embeddings and the encoder (transformers 4.x nests CLIP's in ``vision_model``)."""
    while getattr(backbone, "vision_model", None) is not None and not hasattr(backbone, "embeddings"):
        backbone = backbone.vision_model
    return backbone


def _prefix(model: nn.Module, path: str) -> str:
    """``path`` as a module name of ``model`` (with the ``vision_model.`` a 4.x CLIP puts in front)."""
    inner = _inner(model)
    if inner is model:
        return path
    names = {m: n for n, m in model.named_modules()}
    return f"{names[inner]}.{path}"


class TruncatedBackbone(nn.Module):
    """``fwd(pixels, t=None) -> {block: (N, C, h, w)}`` for a vision backbone, stopping after the deepest block.

    The stem modules, then ``layers[0..deepest-1]`` called as the model's own forward calls
    them (CNN stages with the map; ViT layers with the tokens and no attention mask). ``t`` is
    accepted and ignored: the extract loop calls every model as ``fwd(x, t)``.
    """

    compilable = True

    def __init__(self, backbone: nn.Module, arch: Architecture, blocks: Sequence[int]):
        super().__init__()
        inner = _inner(backbone)
        self.layers = _layers(inner, arch)
        blocks = sorted(set(blocks))
        check_block_numbers(blocks, 0, len(self.layers))
        self.unet = backbone  # the name every forward of diffeat's has for its network (extract reuses it)
        self.stem = nn.ModuleList(_module(inner, p) for p in arch.stem)
        self.blocks = tuple(blocks)
        self.deepest = self.blocks[-1]
        self.vit = arch.kind == "vit"
        config = inner.config
        self.patch = int(config.patch_size) if self.vit else 0
        self.native = int(config.image_size) if self.vit else 0
        self.skip = 1 + (int(getattr(config, arch.registers)) if arch.registers else 0) if self.vit else 0
        # ViT and CLIP take position embeddings of their training size unless asked to interpolate;
        # DINOv2 always interpolates (its embeddings have no such argument).
        embed = inspect.signature(self.stem[0].forward).parameters
        self.can_interpolate = "interpolate_pos_encoding" in embed
        self.modules_run = list(arch.stem) + [f"{_layer_path(inner, arch)}.{i}" for i in range(self.deepest)]

    def _map(self, hidden: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if not self.vit:
            return hidden
        return tokens_to_grid(hidden[:, self.skip:], height // self.patch, width // self.patch)

    def forward(self, pixels: torch.Tensor, timestep: object = None) -> dict[int, torch.Tensor]:
        """The requested blocks of preprocessed images ``pixels`` (N, 3, H, W)."""
        height, width = pixels.shape[-2:]
        first, *rest = self.stem
        if self.can_interpolate and (height, width) != (self.native, self.native):
            hidden = first(pixels, interpolate_pos_encoding=True)
        else:
            hidden = first(pixels)
        for module in rest:
            hidden = module(hidden)
        out: dict[int, torch.Tensor] = {}
        if 0 in self.blocks:
            out[0] = self._map(hidden, height, width)
        for i in range(self.deepest):
            hidden = self.layers[i](hidden, None) if self.vit else self.layers[i](hidden)
            if i + 1 in self.blocks:
                out[i + 1] = self._map(hidden, height, width)
        return out


def _layer_path(inner: nn.Module, arch: Architecture) -> str:
    for path in arch.layers:
        if isinstance(_module(inner, path), nn.ModuleList):
            return path
    raise ModelError(f"internal: a {type(inner).__name__} has none of {', '.join(arch.layers)} (transformers changed "
                     "its module layout)")


def _layers(inner: nn.Module, arch: Architecture) -> nn.ModuleList:
    return _module(inner, _layer_path(inner, arch))


class VisionBackbone:
    """A transformers vision backbone as a ``FeatureModel`` (see the module docstring)."""

    family = "vision"
    first_block = 0
    latent = False
    schedule = None  # no noise and no timestep

    def __init__(self, backbone: nn.Module, arch: Architecture, preprocessing: ImagePreprocessing):
        self.denoiser = backbone  # the interface's name for the network features come from
        self.arch = arch
        self.preprocessing = preprocessing
        inner = _inner(backbone)
        self.depth = len(_layers(inner, arch))
        height, width = preprocessing.output_size
        if height != width:
            raise ModelError(f"the {preprocessing.processor} preprocessing gives {height}x{width} images; diffeat "
                             "extracts square inputs only")
        self.native_resolution = height
        self.patch = int(inner.config.patch_size) if arch.kind == "vit" else None

    def check_resolution(self, resolution: int) -> None:
        """ViTs need a multiple of the patch size; CNNs any size their stem can take (>= 32 px)."""
        from diffeat.models.families.base import check_multiple

        if self.patch:
            check_multiple(resolution, self.patch, f"patches are {self.patch}x{self.patch} pixels",
                           self.native_resolution)
        elif isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32:
            raise DiffeatError(f"--resolution {resolution} does not fit this model: a CNN backbone needs at least 32 "
                               f"px (it downsamples 32x); its native size is {self.native_resolution}")

    def check_unconditional(self) -> None:
        """Nothing to check: a backbone takes the image only."""

    def input_shape(self, resolution: int) -> tuple[int, int, int]:
        """The preprocessed image: (3, R, R)."""
        return (3, resolution, resolution)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels are the model input."""
        return pixels.float()

    def feature_forward(self, blocks: Sequence[int]) -> nn.Module:
        """``TruncatedBackbone``, called as ``fwd(x, t)`` with ``t`` ignored."""
        return TruncatedBackbone(self.denoiser, self.arch, blocks)

    def full_forward(self, x: torch.Tensor, t: object = None) -> torch.Tensor:
        """The backbone's own forward: its ``last_hidden_state``."""
        return self.denoiser(pixel_values=x).last_hidden_state

    def block_table(self, resolution: int | None = None) -> list:
        """Blocks 0..depth at ``resolution`` pixels: shapes from the truncated forward on the meta device."""
        from diffeat.models.blocks import BlockInfo

        resolution = resolution or self.native_resolution
        self.check_resolution(resolution)
        meta = self.on_meta().denoiser
        fwd = TruncatedBackbone(meta, self.arch, range(self.depth + 1))
        with torch.no_grad():
            acts = fwd(torch.zeros(1, 3, resolution, resolution, device="meta"))
        inner_path = _layer_path(_inner(meta), self.arch)
        names = [_prefix(meta, self.arch.stem[-1])] + [_prefix(meta, f"{inner_path}.{i}") for i in range(self.depth)]
        return [BlockInfo(b, names[b], "", int(a.shape[1]), int(a.shape[2]), int(a.shape[3]))
                for b, a in sorted(acts.items())]

    def on_meta(self) -> VisionBackbone:
        """The same backbone on the meta device (shapes only)."""
        if any(p.is_meta for p in self.denoiser.parameters()):
            return self
        with torch.device("meta"):
            meta = type(self.denoiser)(self.denoiser.config)
        return VisionBackbone(meta.eval(), self.arch, self.preprocessing)

    def identity(self, resolution: int | None = None) -> dict:
        """The family, the architecture and the numbering (the preprocessing is the settings' ``preprocess``)."""
        out = {"family": self.family, "input": "pixels", "architecture": self.arch.model_type,
               "class": type(self.denoiser).__name__, "blocks": BLOCKS_RULE}
        resolution = resolution or self.native_resolution
        if self.patch and resolution != int(_inner(self.denoiser).config.image_size):
            out["position_embedding"] = "interpolated to the patch grid"
        return out

    def describe(self) -> dict:
        """Provenance."""
        out = {"family": self.family, "architecture": self.arch.model_type, "depth": self.depth,
               "preprocessing": self.preprocessing.describe(), "kind": self.arch.kind}
        if self.patch:
            out["patch_size"] = self.patch
        return out

    def to(self, device: torch.device | str) -> VisionBackbone:
        """Move the backbone."""
        self.denoiser.to(device)
        return self


# -- folders ------------------------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    """``config.json`` of a transformers folder."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e


def is_vision_config(config: dict) -> bool:
    """A transformers model config (``model_type``), not a diffusers one (``_class_name``)."""
    return "_class_name" not in config and "model_type" in config


def check_folder(folder: Path, config: dict | None = None) -> tuple[Architecture, str, ImagePreprocessing]:
    """(architecture, class to load, preprocessing) of a transformers folder, all checked before any weight loads.

    One-line errors for an unsupported ``model_type`` or ``architectures`` entry, missing weights and
    a missing or unsupported ``preprocessor_config.json``.
    """
    config = read_config(folder) if config is None else config
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"{folder / 'config.json'} describes a transformers model_type {model_type!r}, which diffeat "
                         f"does not take; supported vision backbones: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[model_type]
    declared = list(config.get("architectures") or [])
    cls_name = declared[0] if declared else next(iter(arch.heads))  # no `architectures`: the plain model
    if cls_name not in arch.heads:
        raise ModelError(f"{folder / 'config.json'}: architectures {cls_name!r} is not one diffeat loads for "
                         f"model_type {model_type!r} (known: {', '.join(arch.heads)})")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{folder}: no weights (model.safetensors or pytorch_model.bin) beside config.json; fetch "
                         "them with the config, e.g. `hf download <repo> --local-dir <folder>`")
    return arch, cls_name, read_processor_config(folder)


def load_folder(folder: Path, dtype: torch.dtype | None = None) -> VisionBackbone:
    """A transformers vision folder, strictly: the declared class's every weight, then its backbone."""
    import transformers

    from diffeat.models.components import check_loading_info

    arch, cls_name, preprocessing = check_folder(folder)
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ModelError(f"{folder}: transformers {transformers.__version__} has no {cls_name}")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would bury diffeat's own lines
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                          dtype=dtype if dtype is not None else torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load the {cls_name} in {folder}: {e}") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    check_loading_info(folder, cls_name, info)
    attr = arch.heads[cls_name]
    backbone = getattr(model, attr) if attr else model
    return VisionBackbone(backbone.eval().requires_grad_(False), arch, preprocessing)


def _load(folder: Path, index: dict, dtype: torch.dtype | None) -> VisionBackbone:
    return load_folder(folder, dtype)


# -- random:<arch> ------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: The hub models' own preprocessor configs (microsoft/resnet-50, google/vit-base-patch16-224, facebook/dinov2-small,
#: openai/clip-vit-base-patch32, facebook/convnext-tiny-224).
RESNET_PROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "crop_pct": 0.875, "resample": 3,
                    "size": {"shortest_edge": 224}, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
VIT_PROCESSOR = {"image_processor_type": "ViTImageProcessor", "resample": 2, "size": {"height": 224, "width": 224},
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
DINOV2_PROCESSOR = {"image_processor_type": "BitImageProcessor", "resample": 3, "size": {"shortest_edge": 256},
                    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                    "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "resample": 3, "size": {"shortest_edge": 224},
                  "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _small(processor: dict, crop: int, resize: int) -> dict:
    """``processor`` at toy size: resize to ``resize``, crop ``crop``."""
    out = dict(processor)
    if processor["image_processor_type"] == "ConvNextImageProcessor":
        out.update(size={"shortest_edge": crop}, crop_pct=crop / resize)
    elif "crop_size" in processor:
        out.update(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop})
    else:
        out.update(size={"height": crop, "width": crop})
    return out


@dataclass(frozen=True)
class RandomArch:
    """A ``random:<arch>``: a transformers config class and its options, and the preprocessor config to pair it with."""

    model_type: str
    config_class: str
    config: dict
    processor: dict
    what: str
    extra: dict = field(default_factory=dict)


RANDOM: dict[str, RandomArch] = {
    "resnet50": RandomArch("resnet", "ResNetConfig", dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                                                           depths=[3, 4, 6, 3], layer_type="bottleneck"),
                           RESNET_PROCESSOR, "ResNet-50 (microsoft/resnet-50), 224 px"),
    "vit-b16": RandomArch("vit", "ViTConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                   intermediate_size=3072, image_size=224, patch_size=16),
                          VIT_PROCESSOR, "ViT-B/16 (google/vit-base-patch16-224), 224 px"),
    "dinov2-s14": RandomArch("dinov2", "Dinov2Config", dict(hidden_size=384, num_hidden_layers=12,
                                                            num_attention_heads=6, mlp_ratio=4, image_size=518,
                                                            patch_size=14, layerscale_value=1.0),
                             DINOV2_PROCESSOR, "DINOv2 ViT-S/14 (facebook/dinov2-small), 224 px"),
    "clip-b32": RandomArch("clip_vision_model", "CLIPVisionConfig", dict(hidden_size=768, num_hidden_layers=12,
                                                                         num_attention_heads=12, intermediate_size=3072,
                                                                         image_size=224, patch_size=32),
                           CLIP_PROCESSOR, "CLIP ViT-B/32 vision tower (openai/clip-vit-base-patch32), 224 px"),
    "convnext-t": RandomArch("convnext", "ConvNextConfig", dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
                             RESNET_PROCESSOR, "ConvNeXt-T (facebook/convnext-tiny-224), 224 px"),
    # CPU-sized versions for tests and the demo (32 px).
    "tiny-resnet": RandomArch("resnet", "ResNetConfig", dict(embedding_size=8, hidden_sizes=[16, 32, 32, 64],
                                                             depths=[1, 1, 1, 1], layer_type="bottleneck"),
                              _small(RESNET_PROCESSOR, 32, 36), "a 4-stage bottleneck ResNet at 32 px"),
    "tiny-vit": RandomArch("vit", "ViTConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                    intermediate_size=64, image_size=32, patch_size=8),
                           _small(VIT_PROCESSOR, 32, 32), "a 3-layer ViT/8 at 32 px"),
    "tiny-dinov2": RandomArch("dinov2", "Dinov2Config", dict(hidden_size=32, num_hidden_layers=3,
                                                             num_attention_heads=2, mlp_ratio=2, image_size=56,
                                                             patch_size=8, layerscale_value=1.0),
                              _small(DINOV2_PROCESSOR, 32, 36), "a 3-layer DINOv2 ViT/8 at 32 px"),
    "tiny-clip": RandomArch("clip_vision_model", "CLIPVisionConfig", dict(hidden_size=32, num_hidden_layers=3,
                                                                          num_attention_heads=2, intermediate_size=64,
                                                                          image_size=32, patch_size=8),
                            _small(CLIP_PROCESSOR, 32, 32), "a 3-layer CLIP vision tower at 32 px"),
    "tiny-convnext": RandomArch("convnext", "ConvNextConfig", dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
                                _small(RESNET_PROCESSOR, 32, 36), "a 4-stage ConvNeXt at 32 px"),
}


def build_config(name: str):
    """The transformers config of ``random:<name>``."""
    import transformers

    spec = RANDOM[name]
    return getattr(transformers, spec.config_class)(**spec.config)


def _random(name: str) -> Callable[[str], VisionBackbone]:
    def build(device: str) -> VisionBackbone:
        import transformers

        spec = RANDOM[name]
        arch = ARCHITECTURES[spec.model_type]
        config = build_config(name)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            backbone = getattr(transformers, arch.backbone)(config)
        return VisionBackbone(backbone.eval().requires_grad_(False), arch,
                              from_processor_config(spec.processor, f"random:{name}"))

    return build


FAMILY = ModelFamily(
    name="vision",
    summary="vision backbones from transformers (ResNet, ConvNeXt, ViT, DINOv2, CLIP vision): no noise, no timestep",
    denoiser_classes=tuple(dict.fromkeys(a.backbone for a in ARCHITECTURES.values())),
    latent=False,
    load=_load,
    architectures={name: _random(name) for name in RANDOM},
    timestep=False,
)
