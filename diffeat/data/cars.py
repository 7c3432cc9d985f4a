"""Stanford Cars: the devkit .mat files and the cars_train/ and cars_test/ image folders.

``devkit/cars_meta.mat`` holds ``class_names`` (1×196 cell); the annotation files
hold ``annotations``, a 1×N struct array with fields ``bbox_x1, bbox_y1, bbox_x2,
bbox_y2, class`` (1-based) and ``fname``. The devkit's ``cars_test_annos.mat`` has
no ``class``: test labels come from ``cars_test_annos_withlabels.mat``, released
separately (in the root or in devkit/). The Kaggle mirror's doubled folders
(``cars_train/cars_train/``) are accepted.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import PurePosixPath

from diffeat.data.base import DatasetLayout
from diffeat.data.files import load_mat, mat_ints
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError

_TEST_LABELS = "cars_test_annos_withlabels.mat"


class Cars(DatasetLayout):
    """Stanford Cars: 196 classes, 8,144 train / 8,041 test images."""

    name = "cars"
    splits = ("train", "test")
    standard_splits = ("train", "test")
    required = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat")
    wrappers = ("stanford_cars",)
    tree = f"""\
stanford_cars/
├── devkit/
│   ├── cars_meta.mat              class_names: 1×196 cell
│   └── cars_train_annos.mat       annotations: 1×8144 struct (bbox_x1..bbox_y2, class 1..196, fname)
├── {_TEST_LABELS}   annotations: 1×8041 struct with class (may also sit in devkit/)
├── cars_train/00001.jpg ...
└── cars_test/00001.jpg ..."""
    source = ("the original Stanford URL is gone; use a mirror of car_devkit.tgz, cars_train.tgz, cars_test.tgz "
              f"and {_TEST_LABELS} (e.g. Kaggle, or the torchvision StanfordCars instructions)")

    def _read(self, split: str) -> SampleTable:
        if split == "train":
            annos_path = self._path("devkit/cars_train_annos.mat")
        else:
            candidates = [self._path(_TEST_LABELS), self._path(f"devkit/{_TEST_LABELS}")]
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise DatasetError(f"the cars test labels are missing: neither {candidates[0]} nor {candidates[1]} "
                                   f"exists (devkit/cars_test_annos.mat has no labels). {self.expected()}")
            annos_path = found[0]
        annos = load_mat(annos_path, ("annotations",))["annotations"]
        fields = annos.dtype.names or ()
        absent = [f for f in ("class", "fname") if f not in fields]
        if absent:
            raise DatasetError(f"{annos_path}: the annotations struct has no field {', '.join(absent)} "
                               f"(it has: {', '.join(fields) or 'none'})")
        n_classes = len(self._class_names)
        labels = mat_ints(annos_path, "annotations.class", annos["class"], low=1, high=n_classes) - 1
        folder = f"cars_{split}"
        # Kaggle's mirror unpacks to cars_train/cars_train/*.jpg.
        on_disk = f"{folder}/{folder}" if self._path(f"{folder}/{folder}").is_dir() else folder
        names = [str(f) for f in annos["fname"]]
        ids = [f"{folder}/{PurePosixPath(f).stem}" for f in names]
        return self._table(split, ids, [f"{on_disk}/{f}" for f in names], labels.tolist(), self._class_names)

    @cached_property
    def _class_names(self) -> tuple[str, ...]:
        path = self._path("devkit/cars_meta.mat")
        names = load_mat(path, ("class_names",))["class_names"]
        return tuple(str(n) for n in names)
