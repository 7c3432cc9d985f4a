"""Oxford 102 Flowers: ``jpg/``, ``imagelabels.mat`` and ``setid.mat``.

``imagelabels.mat`` holds ``labels`` (1-based class of image k = 1..8189) and
``setid.mat`` the 1-based image numbers of each split: ``trnid`` (1,020),
``valid`` (1,020) and ``tstid`` (6,149). Image k is ``jpg/image_%05d.jpg``.
There is no official class-name file; a ``cat_to_name.json`` (the widespread
``{"1": "pink primrose", ...}`` file) is used when present.
"""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np

from diffeat.data.base import DatasetLayout
from diffeat.data.files import load_mat, mat_ints
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError

#: diffeat split -> setid.mat variables (trainval is the train+val union many papers train on).
_SPLIT_VARS = {"train": ("trnid",), "val": ("valid",), "trainval": ("trnid", "valid"), "test": ("tstid",)}


class Flowers(DatasetLayout):
    """Oxford Flowers-102: 102 classes; train 1,020, val 1,020, trainval 2,040, test 6,149."""

    name = "flowers"
    splits = ("train", "val", "trainval", "test")
    standard_splits = ("trainval", "test")  # the paper trains on train+val (2,040 images)
    required = ("jpg", "imagelabels.mat", "setid.mat")
    wrappers = ("flowers-102", "flowers102")
    tree = """\
flowers-102/
├── jpg/image_00001.jpg ... image_08189.jpg
├── imagelabels.mat            labels: 1×8189, classes 1..102
├── setid.mat                  trnid, valid, tstid: 1-based image numbers
└── cat_to_name.json           optional {"1": "pink primrose", ...}"""
    source = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, imagelabels.mat, setid.mat)"

    def _read(self, split: str) -> SampleTable:
        labels = self._labels
        numbers = np.concatenate([self._setid[v] for v in _SPLIT_VARS[split]])
        ids = [f"image_{k:05d}" for k in numbers]
        return self._table(split, ids, [f"jpg/{i}.jpg" for i in ids], (labels[numbers - 1] - 1).tolist(),
                           self._class_names)

    @cached_property
    def _labels(self) -> np.ndarray:
        """1-based class of each image (index k-1 for image k)."""
        path = self._path("imagelabels.mat")
        return mat_ints(path, "labels", load_mat(path, ("labels",))["labels"], low=1)

    @cached_property
    def _setid(self) -> dict[str, np.ndarray]:
        path = self._path("setid.mat")
        variables = load_mat(path, ("trnid", "valid", "tstid"))
        n = len(self._labels)
        return {k: mat_ints(path, k, v, low=1, high=n) for k, v in variables.items()}

    @cached_property
    def _class_names(self) -> tuple[str, ...]:
        n_classes = int(self._labels.max())
        path = self._path("cat_to_name.json")
        if not path.is_file():
            return tuple(f"class_{c:03d}" for c in range(1, n_classes + 1))
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"cannot read {path}: {e}") from e
        if not isinstance(names, dict):
            raise DatasetError(f"{path} must be a JSON object {{\"1\": \"pink primrose\", ...}}")
        absent = [str(c) for c in range(1, n_classes + 1) if str(c) not in names]
        if absent:
            raise DatasetError(f"{path} has no name for class {', '.join(absent[:5])} "
                               f"(keys are the 1-based labels \"1\"..\"{n_classes}\")")
        return tuple(str(names[str(c)]) for c in range(1, n_classes + 1))
