"""Image decoding and the paper's evaluation preprocessing.

``preprocess`` is guided-diffusion's ``center_crop_arr`` (the reader the paper's
code uses at evaluation time), so features match the released code: BOX-halve
while the image is at least twice the target, BICUBIC-resize the shorter side to
the target, center-crop, and scale pixels to [-1, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffeat.errors import DatasetError, first_line

#: File suffixes read as images by the folder layouts (compared lower-case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

#: Largest image decoded, in pixels (2**27: about 134 megapixels, 400 MB as RGB). The header is read
#: first, so a decompression bomb (a 20000x20000 PNG of a few kilobytes) is refused before decoding;
#: real photos (ImageNet: 0.2 MP on average, the largest datasets' scans about 50 MP) pass.
MAX_PIXELS = 1 << 27

#: Pillow modes of 16-bit single-channel images, converted by their real bit depth (``I`` is a
#: 16-bit PNG or TIFF in older Pillows): Pillow's own convert("RGB") clips them at 255.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def decode_image(path: Path) -> Image.Image:
    """Open and fully decode ``path`` as an RGB image.

    A missing, truncated or undecodable file raises :class:`DatasetError` naming
    the path (decoding happens here, not lazily later, so the error points at
    the file and not at some tensor operation downstream). An image over
    :data:`MAX_PIXELS` is refused from its header alone; 16-bit grayscale images
    are scaled to 8 bits (65535 -> 255), not clipped.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides instead
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise DatasetError(f"image {path} is {width}x{height} pixels ({width * height / 1e6:.0f} MP): "
                                       f"over the {MAX_PIXELS / 1e6:.0f} MP limit, refused before decoding "
                                       "(a decompression bomb?)")
                if img.mode in _WIDE_MODES:
                    return _sixteen_bit_to_rgb(img)
                # convert() forces the full decode; grayscale/CMYK/palette images become RGB.
                return img.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetError(f"image file {path} does not exist") from e
    except Image.DecompressionBombError as e:
        raise DatasetError(f"image {path} is refused before decoding: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot decode image {path}: {first_line(e)}") from e


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """A 16-bit single-channel image as 8-bit RGB: ``round(v / 257)``, so 0 -> 0 and 65535 -> 255."""
    values = np.asarray(img, dtype=np.int64)
    gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")




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
