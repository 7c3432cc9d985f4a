"""CUB-200-2011 and NABirds: the Caltech-UCSD file scheme (five files joined on image id).

Both ship ``images.txt`` (id -> path under images/), ``image_class_labels.txt``
(id -> class id), ``train_test_split.txt`` (id -> 1 train / 0 test) and
``classes.txt`` (class id -> name). Files are joined on the image id, never on
line order. Rows follow ``images.txt``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from diffeat.data.base import DatasetLayout
from diffeat.data.files import malformed, parse_int, read_mapping
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError

_IMAGES = ("image_id", "path")
_LABELS = ("image_id", "class_id")
_SPLIT = ("image_id", "is_training_image")
_CLASSES = ("class_id", "class_name")


class CUB(DatasetLayout):
    """Caltech-UCSD Birds-200-2011: 200 classes, 5,994 train / 5,794 test images.

    Labels are the class ids of ``classes.txt`` (1..200) in sorted order, made
    0-based; class names are the names in ``classes.txt`` (``001.Black_footed_Albatross``).
    """

    name = "cub"
    splits = ("train", "test")
    standard_splits = ("train", "test")
    required = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
    wrappers = ("CUB_200_2011",)
    tree = """\
CUB_200_2011/
├── images.txt                 <image_id> <class_folder>/<file>.jpg
├── image_class_labels.txt     <image_id> <class_id 1..200>
├── train_test_split.txt       <image_id> <1 = train, 0 = test>
├── classes.txt                <class_id> <class_name>
└── images/<NNN.Class_name>/<file>.jpg"""
    source = "https://data.caltech.edu/records/20098 (CUB_200_2011.tgz)"
    #: Keep only classes that have images (NABirds lists hierarchy nodes that have none).
    only_used_classes = False

    def _read(self, split: str) -> SampleTable:
        ids, relpaths, labels, is_train, class_names = self._parsed
        rows = [i for i, t in enumerate(is_train) if t == (split == "train")]
        return self._table(split, [ids[i] for i in rows], [relpaths[i] for i in rows],
                           [labels[i] for i in rows], class_names)

    @cached_property
    def _parsed(self) -> tuple[list[str], list[str], list[int], list[bool], tuple[str, ...]]:
        """Both splits at once: (ids, relpaths, labels, is_train, class_names) in images.txt order."""
        classes_path, labels_path = self._path("classes.txt"), self._path("image_class_labels.txt")
        split_path = self._path("train_test_split.txt")
        class_names: dict[int, str] = {}
        for key, (lineno, name) in read_mapping(classes_path, _CLASSES).items():
            class_names[parse_int(classes_path, lineno, _CLASSES, f"{key} {name}", key)] = name
        images = read_mapping(self._path("images.txt"), _IMAGES)
        label_of = read_mapping(labels_path, _LABELS)
        split_of = read_mapping(split_path, _SPLIT)

        ids, relpaths, class_ids, is_train = [], [], [], []
        for image_id, (lineno, rel) in images.items():
            class_ids.append(self._class_id(labels_path, label_of, image_id, lineno, class_names))
            is_train.append(self._is_train(split_path, split_of, image_id, lineno))
            ids.append(image_id)
            relpaths.append(f"images/{rel}")

        used = sorted(set(class_ids)) if self.only_used_classes else sorted(class_names)
        index = {c: i for i, c in enumerate(used)}
        return ids, relpaths, [index[c] for c in class_ids], is_train, tuple(class_names[c] for c in used)

    @staticmethod
    def _class_id(path: Path, label_of: dict[str, tuple[int, str]], image_id: str, image_line: int,
                  class_names: dict[int, str]) -> int:
        if image_id not in label_of:
            raise DatasetError(f"{path} has no line for image {image_id} (images.txt line {image_line})")
        lineno, value = label_of[image_id]
        class_id = parse_int(path, lineno, _LABELS, f"{image_id} {value}", value)
        if class_id not in class_names:
            raise malformed(path, lineno, _LABELS, f"{image_id} {value}", f"class {class_id} is not in classes.txt")
        return class_id

    @staticmethod
    def _is_train(path: Path, split_of: dict[str, tuple[int, str]], image_id: str, image_line: int) -> bool:
        if image_id not in split_of:
            raise DatasetError(f"{path} has no line for image {image_id} (images.txt line {image_line})")
        lineno, value = split_of[image_id]
        if value not in ("0", "1"):
            raise malformed(path, lineno, _SPLIT, f"{image_id} {value}", "the flag must be 1 (train) or 0 (test)")
        return value == "1"


class NABirds(CUB):
    """NABirds (Cornell Lab): 555 visual categories, 23,929 train / 24,633 test images.

    Same file scheme as CUB, but image ids are UUIDs and class ids are sparse
    (``classes.txt`` also lists the taxonomy's inner nodes, which have no images):
    the classes that have images are mapped to 0..K-1 in sorted class-id order.
    """

    name = "nabirds"
    wrappers = ("nabirds",)
    tree = """\
nabirds/
├── images.txt                 <image_uuid> <class_folder>/<file>.jpg
├── image_class_labels.txt     <image_uuid> <class_id (sparse)>
├── train_test_split.txt       <image_uuid> <1 = train, 0 = test>
├── classes.txt                <class_id> <class name>
└── images/<NNNN>/<file>.jpg"""
    source = "https://dl.allaboutbirds.org/nabirds (request access; nabirds.tar.gz)"
    only_used_classes = True
