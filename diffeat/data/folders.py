"""Folder layouts: any ``root/SPLIT/CLASS/image`` tree, and ImageNet's ``train/``, ``val/`` wnid folders.

Class labels come from the sorted union of class folder names over all splits,
so a class missing from one split does not shift the labels of the others
(torchvision's ImageFolder, applied per split, would).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from diffeat.data.base import DatasetLayout
from diffeat.data.files import malformed, read_rows
from diffeat.data.images import IMAGE_EXTENSIONS
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError

logger = logging.getLogger(__name__)

_WNID = re.compile(r"n\d{8}")


def _subdirs(path: Path) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``path`` (empty if it is not a folder)."""
    if not path.is_dir():
        return []
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path, recursive: bool) -> list[str]:
    """Image files under ``folder`` as sorted posix paths relative to it (hidden entries skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


class ImageFolder(DatasetLayout):
    """Any dataset stored as ``root/SPLIT/CLASS/image`` (the splits are the subfolders present).

    Labels index the sorted union of class folder names; images may sit in nested
    folders below their class folder. ``standard_splits`` is (train, test) picked
    from the split names (``train``/``training``; ``test``/``val``/``validation``/``eval``).
    """

    name = "imagefolder"
    tree = """\
root/
├── train/<class>/<image>      any split names; .jpg .jpeg .png .bmp .gif .tif .webp ...
├── val/<class>/<image>
└── test/<class>/<image>       classes: sorted union of the class folders of all splits"""
    source = "your own images, sorted into one folder per class inside one folder per split"
    train_names = ("train", "training")
    test_names = ("test", "val", "validation", "eval")
    recursive = True  # images in nested folders under a class folder belong to that class

    def __init__(self, root: str | Path | None = None, *, classes: str | Path | None = None) -> None:
        super().__init__(root, classes=classes)
        self.splits = self._find_splits()

    def _find_splits(self) -> tuple[str, ...]:
        splits = tuple(_subdirs(self._path(".")))
        if not splits:
            raise DatasetError(f"{self.root} has no split folders. {self.expected()}")
        for split in splits:
            if not _subdirs(self._path(split)) and _images_under(self._path(split), recursive=False):
                raise DatasetError(f"{self._path(split)} holds images but no class folders: imagefolder needs "
                                   f"root/SPLIT/CLASS/image (point --root one level higher?). {self.expected()}")
        return splits

    @classmethod
    def standard_pair(cls, splits: Sequence[str]) -> tuple[str, str] | None:
        """(train, test) told apart by folder name: train/ or training/; test/, val/, validation/ or eval/."""
        train = next((s for s in cls.train_names if s in splits), None)
        test = next((s for s in cls.test_names if s in splits), None)
        return (train, test) if train is not None and test is not None else None

    @property
    def standard_splits(self) -> tuple[str, str]:  # type: ignore[override]
        """(train split, test split) by name; a DatasetError if the folder names do not say which is which."""
        pair = self.standard_pair(self.splits)
        if pair is None:
            raise DatasetError(f"cannot tell the train and test splits of {self.root} apart (splits: "
                               f"{', '.join(self.splits)}): name them train/ and test/ (or val/), or pass the "
                               f"splits explicitly")
        return pair

    @cached_property
    def _class_names(self) -> tuple[str, ...]:
        return tuple(sorted({c for s in self.splits for c in _subdirs(self._path(s))}))

    def _read(self, split: str) -> SampleTable:
        ids, relpaths, labels = [], [], []
        present = set(_subdirs(self._path(split)))
        absent = [c for c in self._class_names if c not in present]
        if absent:  # legal (labels stay aligned) but usually worth knowing
            logger.warning("%s split %r has no folder for %d of %d classes: %s", self.name, split, len(absent),
                           len(self._class_names), ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else ""))
        for label, class_name in enumerate(self._class_names):
            if class_name not in present:
                continue
            for rel in _images_under(self._path(f"{split}/{class_name}"), self.recursive):
                relpath = f"{split}/{class_name}/{rel}"
                ids.append(self._sample_id(relpath))
                relpaths.append(relpath)
                labels.append(label)
        return self._table(split, ids, relpaths, labels, self._class_names)

    @staticmethod
    def _sample_id(relpath: str) -> str:
        """The id of the image at ``relpath``; the path itself, since file names may repeat across splits."""
        return relpath


class ImageNet(ImageFolder):
    """ILSVRC-2012 with ``train/<wnid>/`` and ``val/<wnid>/`` (val sorted into class folders).

    With ``classes`` (a text file, one wnid per line, optionally followed by a
    name, e.g. SCAN's ``imagenet_50.txt``) only those classes are read, labelled
    0..K-1 in file order. Ids are file stems, which are unique in ImageNet, so a
    subset shares ids (and noise) with the full dataset.
    """

    name = "imagenet"
    splits = ("train", "val")
    standard_splits = ("train", "val")
    accepts_classes = True
    recursive = False
    tree = """\
imagenet/
├── train/<wnid>/<wnid>_<n>.JPEG        e.g. train/n01440764/n01440764_10026.JPEG
└── val/<wnid>/ILSVRC2012_val_<n>.JPEG  val sorted into wnid folders (e.g. with valprep.sh)
classes file (optional): one wnid per line, e.g. 'n01601694 Dipper' (ImageNet-50 = SCAN's imagenet_50.txt)"""
    source = "https://image-net.org/ (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar; requires an account)"

    def _find_splits(self) -> tuple[str, ...]:
        present = [s for s in ImageNet.splits if self._path(s).is_dir()]
        if not present:
            raise DatasetError(f"imagenet root {self.root} has neither train/ nor val/. {self.expected()}")
        for split in present:
            if not _subdirs(self._path(split)) and _images_under(self._path(split), recursive=False):
                raise DatasetError(f"{self._path(split)} holds images but no wnid folders: sort them into "
                                   f"{split}/<wnid>/ first (for val, e.g. with valprep.sh). {self.expected()}")
        return ImageNet.splits

    def _read(self, split: str) -> SampleTable:
        if not self._path(split).is_dir():
            raise DatasetError(f"imagenet split {split!r} is missing: {self._path(split)} does not exist. "
                               f"{self.expected()}")
        return super()._read(split)

    @cached_property
    def _class_names(self) -> tuple[str, ...]:
        found = {c for s in self.splits for c in _subdirs(self._path(s))}
        if self.classes_file is None:
            return tuple(sorted(found))
        path, fields = self.classes_file, ("wnid", "name")
        wnids: dict[str, int] = {}
        for lineno, (line,) in read_rows(path, ("line",)):
            wnid = line.split()[0]
            if not _WNID.fullmatch(wnid):
                raise malformed(path, lineno, fields, line, f"{wnid!r} is not a WordNet id like n01440764")
            if wnid in wnids:
                raise malformed(path, lineno, fields, line, f"{wnid} already on line {wnids[wnid]}")
            if wnid not in found:
                raise DatasetError(f"{path}:{lineno}: wnid {wnid} has no folder under {self._path('train')} "
                                   f"or {self._path('val')}")
            wnids[wnid] = lineno
        if not wnids:
            raise DatasetError(f"class list {path} is empty (expected one wnid per line)")
        return tuple(wnids)

    @staticmethod
    def _sample_id(relpath: str) -> str:
        return Path(relpath).stem
