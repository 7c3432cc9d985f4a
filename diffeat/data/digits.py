"""A built-in dataset for demos and tests: scikit-learn's 8×8 handwritten digits (no download, no root).

The 1,797 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn)
become 32×32 RGB images: intensities 0..16 scaled to 0..255, each pixel repeated
4×4 (nearest upscale). The split is fixed: sample i is ``test`` when i % 5 == 0.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from diffeat.data.base import DatasetLayout
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError

SIZE = 32
_SCALE = SIZE // 8
_PREFIX = "digits-"


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 (N, 32, 32) images and int64 targets; loaded once per process."""
    from sklearn.datasets import (
        load_digits,  # sklearn is slow to import; only this dataset needs it
    )

    data = load_digits()
    pixels = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)
    pixels = pixels.repeat(_SCALE, axis=1).repeat(_SCALE, axis=2)
    return pixels, data.target.astype(np.int64)


class Digits(DatasetLayout):
    """scikit-learn digits: 10 classes ("0".."9"), 1,437 train / 360 test 32×32 images."""

    name = "digits"
    splits = ("train", "test")
    standard_splits = ("train", "test")
    builtin = True
    tree = "(built in: no files; the images ship with scikit-learn)"
    source = "scikit-learn (sklearn.datasets.load_digits)"

    def _read(self, split: str) -> SampleTable:
        _, targets = _digits()
        rows = [i for i in range(len(targets)) if (i % 5 == 0) == (split == "test")]
        return SampleTable(dataset=self.name, split=split, root=None, ids=tuple(f"{_PREFIX}{i:04d}" for i in rows),
                           relpaths=("",) * len(rows), labels=targets[rows], class_names=tuple(map(str, range(10))),
                           builtin_image=Digits.builtin_image)

    @staticmethod
    def builtin_image(sample_id: str) -> Image.Image:
        """The 32×32 RGB image of ``digits-NNNN``."""
        pixels, _ = _digits()
        index = sample_id.removeprefix(_PREFIX)
        if not (sample_id.startswith(_PREFIX) and index.isdigit() and int(index) < len(pixels)):
            raise DatasetError(f"{sample_id!r} is not a digits sample id (digits-0000 .. digits-{len(pixels) - 1:04d})")
        return Image.fromarray(pixels[int(index)]).convert("RGB")
