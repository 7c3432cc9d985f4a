"""A vision backbone's own image preprocessing: resize, center crop, rescale, normalize.

The parameters come from the model's ``preprocessor_config.json``, read by the transformers
image-processor class the file names (its defaults and ``size``/``crop_size`` conventions
are transformers', not ours); the pixels are computed here with PIL and numpy, exactly as the
processor's PIL backend computes them:

* resize with PIL (the processor's ``resample`` filter) to either a fixed ``height × width``
  (``ViTImageProcessor``) or so the shorter side is ``shortest_edge`` (``CLIPImageProcessor``,
  ``BitImageProcessor``: DINOv2), the longer side ``int(shortest_edge · long / short)``;
  ``ConvNextImageProcessor`` (ResNet, ConvNeXt) resizes the shorter side to
  ``int(shortest_edge / crop_pct)`` and crops ``shortest_edge`` (below 384 px; at 384 and
  above it warps to a square);
* center crop at ``top = (h − crop_h) // 2``, ``left = (w − crop_w) // 2`` (zero-padded when
  the image is smaller than the crop);
* ``x · rescale_factor`` in float64, then ``(x − mean) / std`` in float32.

``tests/test_vision.py`` checks the result against ``AutoImageProcessor`` on real JPEGs. The
rule (not where it came from) enters the settings hash of every setting extracted with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from diffeat.errors import ModelError
from diffeat.models.json_files import read_json

#: Image-processor classes whose rule this module reproduces (``image_processor_type`` or the older
#: ``feature_extractor_type``), by the transformers class that reads their config.
PROCESSOR_CLASSES: dict[str, str] = {
    "ViTImageProcessor": "ViTImageProcessorPil",
    "ViTFeatureExtractor": "ViTImageProcessorPil",
    "CLIPImageProcessor": "CLIPImageProcessorPil",
    "CLIPFeatureExtractor": "CLIPImageProcessorPil",
    "BitImageProcessor": "BitImageProcessorPil",
    "ConvNextImageProcessor": "ConvNextImageProcessorPil",
    "ConvNextFeatureExtractor": "ConvNextImageProcessorPil",
}
_RESAMPLE_NAMES = {int(r): r.name.lower() for r in Image.Resampling}


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an RGB image becomes a model input (3, H, W), float32: see the module docstring.

    ``resize``: ``("shortest_edge", n)`` or ``("exact", h, w)`` (None: no resize); ``crop``:
    (h, w) or None; ``rescale``: the factor (1/255) or None; ``mean``/``std``: per channel, or
    None (no normalisation). ``processor`` names the class the rule came from (provenance only).
    """

    resize: tuple | None
    resample: int
    crop: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    processor: str = ""

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of the preprocessed image."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "exact":
            return (int(self.resize[1]), int(self.resize[2]))
        raise ModelError(f"the {self.processor or 'image'} preprocessing neither crops nor resizes to a fixed size: "
                         "images of different shapes cannot be batched")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """``image`` (RGB) -> float32 (3, H, W)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.resize is not None:
            image = image.resize(self._resized_size(image.size), resample=self.resample)
        arr = np.asarray(image)
        if self.crop is not None:
            arr = _center_crop(arr, *self.crop)
        x = arr.astype(np.float64) * self.rescale if self.rescale is not None else arr.astype(np.float64)
        x = x.astype(np.float32)
        if self.mean is not None:
            mean = np.asarray(self.mean, dtype=np.float32)
            std = np.asarray(self.std, dtype=np.float32)
            x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """PIL (width, height) after the resize step."""
        width, height = size
        if self.resize[0] == "exact":
            return int(self.resize[2]), int(self.resize[1])
        edge = int(self.resize[1])
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (edge, new_long) if width <= height else (new_long, edge)

    def at(self, resolution: int) -> ImagePreprocessing:
        """The same rule scaled to output ``resolution``² (resize and crop by one factor; exact resizes square)."""
        height, width = self.output_size
        if (height, width) == (resolution, resolution):
            return self
        if self.resize is None or self.resize[0] == "exact":
            resize = None if self.resize is None else ("exact", resolution, resolution)
            return replace(self, resize=resize, crop=None if self.crop is None else (resolution, resolution))
        edge = int(self.resize[1] * resolution / height)
        return replace(self, resize=("shortest_edge", edge), crop=(resolution, resolution))

    def identity(self) -> dict:
        """What determines the pixels (the settings hash): the rule's parameters, not where they came from."""
        out = asdict(self)
        out.pop("processor")
        out["resize"] = None if self.resize is None else list(self.resize)
        out["crop"] = None if self.crop is None else list(self.crop)
        out["resample"] = _RESAMPLE_NAMES.get(self.resample, str(self.resample))
        out["mean"] = None if self.mean is None else list(self.mean)
        out["std"] = None if self.std is None else list(self.std)
        out["rule"] = "transformers image processor (PIL): resize, center crop, rescale, normalize"
        return out

    def describe(self) -> dict:
        """Provenance: the rule and the processor class it came from."""
        return {**self.identity(), "processor": self.processor}


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> the central ``height × width``, zero-padded (centred) when the image is smaller."""
    h, w = arr.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return arr[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = arr
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):max(0, top) + height, max(0, left):max(0, left) + width]


def _field(obj: object, key: str) -> object:
    """``obj[key]`` or ``obj.key`` (transformers keeps sizes as dicts in some versions, ``SizeDict`` in others)."""
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def from_processor_config(config: dict, where: str) -> ImagePreprocessing:
    """The rule of a ``preprocessor_config.json`` (its contents ``config``), read by transformers' own class.

    ``where`` names the file for errors. Processor classes other than ``PROCESSOR_CLASSES`` are refused.
    """
    import transformers

    kind = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
    kind = kind[:-4] if kind.endswith("Fast") else kind
    if kind not in PROCESSOR_CLASSES:
        raise ModelError(f"{where}: image processor {kind or '(none named)'!r} is not supported; diffeat reproduces "
                         f"{', '.join(sorted(set(PROCESSOR_CLASSES)))}")
    cls = getattr(transformers, PROCESSOR_CLASSES[kind], None)
    if cls is None:
        raise ModelError(f"{where}: transformers {transformers.__version__} has no {PROCESSOR_CLASSES[kind]}")
    options = {k: v for k, v in config.items() if not k.startswith("_") and k not in
               ("image_processor_type", "feature_extractor_type", "processor_class")}
    try:
        p = cls(**options)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: {kind} does not accept this configuration: {e}") from e
    size, crop_size = getattr(p, "size", None), getattr(p, "crop_size", None)
    resize = None
    if getattr(p, "do_resize", True):
        if _field(size, "shortest_edge") and not _field(size, "longest_edge"):
            resize = ("shortest_edge", int(_field(size, "shortest_edge")))
        elif _field(size, "height") and _field(size, "width"):
            resize = ("exact", int(_field(size, "height")), int(_field(size, "width")))
        else:
            raise ModelError(f"{where}: size {dict(size) if isinstance(size, dict) else size} is not supported "
                             "(diffeat takes shortest_edge, or height and width)")
    crop = None
    if getattr(p, "do_center_crop", False):
        crop = (int(_field(crop_size, "height")), int(_field(crop_size, "width")))
    crop_pct = getattr(p, "crop_pct", None)
    if kind.startswith("ConvNext") and resize is not None:
        # ConvNextImageProcessor: below 384 px, resize the shorter side to shortest_edge / crop_pct and crop
        # shortest_edge; at 384 and above, warp to a square (its own `resize`).
        edge = resize[1]
        if edge < 384:
            resize, crop = ("shortest_edge", int(edge / (crop_pct or 224 / 256))), (edge, edge)
        else:
            resize = ("exact", edge, edge)
    resample = getattr(p, "resample", Image.Resampling.BILINEAR)
    mean = tuple(float(v) for v in p.image_mean) if getattr(p, "do_normalize", False) else None
    std = tuple(float(v) for v in p.image_std) if mean is not None else None
    if mean is not None and len(mean) == 1:
        mean, std = mean * 3, std * 3
    rescale = float(p.rescale_factor) if getattr(p, "do_rescale", False) else None
    return ImagePreprocessing(resize, int(resample if resample is not None else Image.Resampling.BILINEAR), crop,
                              rescale, mean, std, kind)


def read_processor_config(folder: Path) -> ImagePreprocessing:
    """The preprocessing of a model folder (its ``preprocessor_config.json``), or a one-line ``ModelError``."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no preprocessor_config.json (the model's own image preprocessing: resize, crop, "
                         "mean/std); fetch it with the weights, e.g. `hf download <repo> preprocessor_config.json`")
    return from_processor_config(read_json(path), str(path))
