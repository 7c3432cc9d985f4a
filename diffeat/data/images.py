"""Image decoding and the paper's evaluation preprocessing.

``preprocess`` is guided-diffusion's ``center_crop_arr`` (the reader the paper's
code uses at evaluation time), so features match the released code: BOX-halve
while the image is at least twice the target, BICUBIC-resize the shorter side to
the target, center-crop, and scale pixels to [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffeat.errors import DatasetError

#: File suffixes read as images by the folder layouts (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def decode_image(path: Path) -> Image.Image:
    """Open and fully decode ``path`` as an RGB image.

    A missing, truncated or undecodable file raises :class:`DatasetError` naming
    the path (decoding happens here, not lazily later, so the error points at
    the file and not at some tensor operation downstream).
    """
    try:
        with Image.open(path) as img:
            # convert() forces the full decode; grayscale/CMYK/palette images become RGB.
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetError(f"image file {path} does not exist") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from e


def preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """Center-crop ``image`` to ``resolution``² the guided-diffusion way; float32 (3, R, R) in [-1, 1].

    Steps (``guided_diffusion.image_datasets.center_crop_arr``): while the shorter
    side is >= 2·R, halve the image with a BOX filter; then BICUBIC-resize so the
    shorter side is R (this also upscales small images, e.g. 32 px digits for a
    64 px model); take the central R×R crop; map x -> x/127.5 - 1.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    arr = arr[top : top + resolution, left : left + resolution]
    return (arr.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()
