"""The base class of every dataset reader.

A layout reads one dataset from its official on-disk layout (never downloading
anything) and hands out one :class:`~diffeat.data.table.SampleTable` per split.
Opening a layout checks that the annotation files are there, listing everything
missing at once with the expected tree; parsing happens when a split is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError
from diffeat.runtime.checks import check_choice

logger = logging.getLogger(__name__)


class DatasetLayout:
    """One dataset read from its official layout under ``root``.

    Subclasses set the class attributes and implement :meth:`_read`. ``tree`` is the
    expected directory tree shown in errors (and in docs/datasets.md), ``source`` says
    where to get the data, ``required`` lists the files that must exist under the
    resolved root, and ``wrappers`` the folder names that may sit between the root a
    user gives and the real one (``CUB_200_2011/`` when pointing at its parent).
    """

    name: str = ""
    splits: tuple[str, ...] = ()
    standard_splits: tuple[str, str] = ("train", "test")
    builtin: bool = False  # built-in datasets take no root
    accepts_classes: bool = False  # only imagenet takes a class list
    tree: str = ""
    source: str = ""
    required: tuple[str, ...] = ()
    wrappers: tuple[str, ...] = ()

    def __init__(self, root: str | Path | None = None, *, classes: str | Path | None = None) -> None:
        self.root: Path | None = None if root is None else self._resolve_root(Path(root).expanduser())
        self.classes_file = None if classes is None else Path(classes).expanduser()
        self._tables: dict[str, SampleTable] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root) if self.root else None!r})"

    @classmethod
    def standard_pair(cls, splits: Sequence[str]) -> tuple[str, str] | None:
        """The (train, test) pair of this layout among ``splits`` (those a folder or a store holds), or None."""
        train, test = cls.standard_splits
        return (train, test) if train in splits and test in splits else None

    def samples(self, split: str) -> SampleTable:
        """The sample table of ``split``; an unknown split raises :class:`DatasetError` listing the valid ones."""
        check_choice(split, self.splits, f"{self.name} split", error=DatasetError)
        if split not in self._tables:
            table = self._read(split)
            logger.debug("%s/%s: %d samples, %d classes", self.name, split, len(table), len(table.class_names))
            self._tables[split] = table
        return self._tables[split]

    def _read(self, split: str) -> SampleTable:
        """Parse ``split`` into a sample table (``split`` is already validated); each layout defines it."""
        raise TypeError(f"{type(self).__name__} must define _read(split)")

    @staticmethod
    def builtin_image(sample_id: str) -> Image.Image:
        """The image of ``sample_id`` for built-in datasets (which have no files)."""
        raise DatasetError(f"sample {sample_id!r} has no file and this dataset is not built in")

    def _path(self, relpath: str) -> Path:
        """``root / relpath`` (file-based layouts always have a root once opened)."""
        assert self.root is not None, "built-in layouts have no files"
        return self.root / relpath

    @classmethod
    def expected(cls) -> str:
        """The expected layout and where to get it, for error messages."""
        return f"{cls.name} expects this layout under --root:\n{cls.tree.rstrip()}\nGet it from: {cls.source}"

    def _resolve_root(self, root: Path) -> Path:
        """Return the folder holding the dataset: ``root`` itself or one of its ``wrappers`` subfolders."""
        if not root.exists():
            raise DatasetError(f"dataset root {root} does not exist. {self.expected()}")
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} is not a directory. {self.expected()}")
        for candidate in (root, *(root / w for w in self.wrappers)):
            if all((candidate / f).exists() for f in self.required):
                return candidate
        missing = [f for f in self.required if not (root / f).exists()]
        raise DatasetError(f"{self.name} root {root} is missing {', '.join(missing)}. {self.expected()}")

    def _table(self, split: str, ids: list[str], relpaths: list[str], labels: list[int],
               class_names: list[str] | tuple[str, ...]) -> SampleTable:
        """Build this layout's table for ``split``; an empty split is an error (nothing to extract)."""
        if not ids:
            raise DatasetError(f"{self.name} split {split!r} under {self.root} has no samples. {self.expected()}")
        return SampleTable(dataset=self.name, split=split, root=self.root, ids=tuple(ids), relpaths=tuple(relpaths),
                           labels=np.asarray(labels, dtype=np.int64), class_names=tuple(class_names),
                           builtin_image=type(self).builtin_image if self.builtin else None)
