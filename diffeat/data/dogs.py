"""Stanford Dogs: ``Images/<synset-breed>/`` and the split lists ``lists/{train,test}_list.mat``.

Each list holds ``file_list`` (N×1 cell of ``n02085620-Chihuahua/n02085620_5927.jpg``,
relative to Images/), ``annotation_list`` and ``labels`` (N×1, 1-based). Class
names are the breed folder names, read from both lists so labels agree between
splits.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import PurePosixPath

import numpy as np

from diffeat.data.base import DatasetLayout
from diffeat.data.files import load_mat, mat_ints
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError


class Dogs(DatasetLayout):
    """Stanford Dogs: 120 breeds, 12,000 train / 8,580 test images."""

    name = "dogs"
    splits = ("train", "test")
    standard_splits = ("train", "test")
    required = ("Images", "lists/train_list.mat", "lists/test_list.mat")
    wrappers = ("stanford_dogs", "StanfordDogs")
    tree = """\
stanford_dogs/
├── Images/<synset>-<breed>/<synset>_<n>.jpg     e.g. Images/n02085620-Chihuahua/n02085620_5927.jpg
└── lists/
    ├── train_list.mat       file_list (N×1 cell, relative to Images/), labels (N×1, 1..120)
    └── test_list.mat"""
    source = "http://vision.stanford.edu/aditya86/ImageNetDogs/ (images.tar and lists.tar)"

    def _read(self, split: str) -> SampleTable:
        files, labels = self._lists[split]
        ids = [PurePosixPath(f).stem for f in files]
        return self._table(split, ids, [f"Images/{f}" for f in files], (labels - 1).tolist(), self._class_names)

    @cached_property
    def _lists(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """split -> (file_list entries, 1-based labels), for both splits (class names need both)."""
        out = {}
        for split in self.splits:
            path = self._path(f"lists/{split}_list.mat")
            mat = load_mat(path, ("file_list", "labels"))
            files = [PurePosixPath(str(f).replace("\\", "/")).as_posix() for f in mat["file_list"]]
            labels = mat_ints(path, "labels", mat["labels"], low=1)
            if len(files) != len(labels):
                raise DatasetError(f"{path}: file_list has {len(files)} entries but labels has {len(labels)}")
            out[split] = (files, labels)
        return out

    @cached_property
    def _class_names(self) -> tuple[str, ...]:
        """Label k -> the breed folder its files sit in; one folder per label, checked."""
        folder_of: dict[int, tuple[str, str]] = {}
        for split, (files, labels) in self._lists.items():
            for f, label in zip(files, labels.tolist()):
                folder = PurePosixPath(f).parent.as_posix()
                known = folder_of.setdefault(label, (folder, split))
                if known[0] != folder:
                    raise DatasetError(f"{self._path(f'lists/{split}_list.mat')}: label {label} is used for both "
                                       f"{known[0]}/ and {folder}/ (in {known[1]}_list.mat)")
        if not folder_of:
            raise DatasetError(f"the Stanford Dogs lists under {self._path('lists')} are empty. {self.expected()}")
        n_classes = max(folder_of)
        absent = [k for k in range(1, n_classes + 1) if k not in folder_of]
        if absent:
            raise DatasetError(f"Stanford Dogs lists under {self._path('lists')} have no image of label "
                               f"{', '.join(map(str, absent[:5]))}: cannot name those classes")
        return tuple(folder_of[k][0] for k in range(1, n_classes + 1))
