"""The sample table: one dataset split as rows of (id, relative path, label).

Every reader produces a :class:`SampleTable`; everything downstream (extraction,
the store, probes) only sees this table. It is immutable and picklable, so it can
be sent to DataLoader worker processes as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from diffeat.data.images import decode_image
from diffeat.errors import DatasetError

#: How many missing files an error names before summarising the rest.
_SHOW_MISSING = 5


@dataclass(frozen=True, eq=False)
class SampleTable:
    """The samples of one split of one dataset, in a fixed order (the order of feature rows).

    ``ids`` are unique across every split of the dataset and seed the noise of each
    sample; ``relpaths`` are posix paths relative to ``root`` (``""`` for built-in
    datasets, whose ``root`` is ``None``); ``labels`` are 0-based int64 indices into
    ``class_names``, which are the same for every split of a dataset.
    """

    dataset: str
    split: str
    root: Path | None
    ids: tuple[str, ...]
    relpaths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    #: How a built-in dataset (``root is None``) decodes a sample id: its layout's ``builtin_image``.
    builtin_image: Callable[[str], Image.Image] | None = None

    def __post_init__(self) -> None:
        # Normalise what readers pass (lists, Python ints) so equal tables hash equally.
        labels = np.array(self.labels, dtype=np.int64, copy=True).reshape(-1)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "relpaths", tuple(str(p) for p in self.relpaths))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))
        n = len(self.ids)
        if len(self.relpaths) != n or len(labels) != n:
            raise ValueError(f"sample table {self.dataset}/{self.split}: {n} ids, {len(self.relpaths)} paths, "
                             f"{len(labels)} labels")
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"sample table {self.dataset}/{self.split}: labels outside 0..{len(self.class_names) - 1}")
        if len(set(self.ids)) != n:
            # An annotation file listing an image twice: a user's data problem, so name the id.
            seen: set[str] = set()
            for sample_id in self.ids:
                if sample_id in seen:
                    raise DatasetError(f"{self.dataset}/{self.split} under {self.root} lists sample {sample_id!r} "
                                       "more than once")
                seen.add(sample_id)

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> SampleTable:
        """The first ``n`` rows (all rows if there are fewer), e.g. for ``--limit``."""
        if n < 0:
            raise ValueError(f"head(n) needs n >= 0, got {n}")
        return dataclasses.replace(self, ids=self.ids[:n], relpaths=self.relpaths[:n], labels=self.labels[:n])

    def manifest_sha256(self) -> str:
        """SHA-256 (hex) identifying this table's content; equal tables give equal hashes.

        The hashed bytes are the canonical JSON (UTF-8, sorted keys, no spaces,
        non-ASCII kept) of ``{"class_names": [...], "dataset": ..., "rows":
        [[id, relpath, label], ...], "split": ...}``. ``root`` is not part of it:
        the same dataset copied elsewhere is the same manifest.
        """
        return self._manifest_sha256

    @cached_property
    def _manifest_sha256(self) -> str:
        # Streamed row by row (same bytes as json.dumps of the whole dict) so a
        # 1.3M-row ImageNet table never becomes one huge string. Cached in
        # __dict__ because extraction asks for it once per setting.
        def enc(value: object) -> str:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

        h = hashlib.sha256()
        h.update(f'{{"class_names":{enc(list(self.class_names))},"dataset":{enc(self.dataset)},"rows":['.encode())
        for i, (sid, rel, label) in enumerate(zip(self.ids, self.relpaths, self.labels.tolist())):
            h.update((("," if i else "") + enc([sid, rel, label])).encode())
        h.update(f'],"split":{enc(self.split)}}}'.encode())
        return h.hexdigest()

    def path(self, i: int) -> Path:
        """Absolute path of row ``i`` (only for datasets read from disk)."""
        if self.root is None:
            raise DatasetError(f"{self.dataset} is built in: its samples have no files")
        return self.root / self.relpaths[i]

    def check_files(self) -> None:
        """Stat every file of the table; raise :class:`DatasetError` naming the first few missing ones."""
        if self.root is None:
            return
        missing = []
        for rel in self.relpaths:
            try:
                ok = stat.S_ISREG(os.stat(self.root / rel).st_mode)
            except OSError:
                ok = False
            if not ok:
                missing.append(rel)
        if missing:
            shown = ", ".join(missing[:_SHOW_MISSING])
            more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
            raise DatasetError(f"{self.dataset}/{self.split}: {len(missing)} of {len(self)} image files are missing "
                               f"under {self.root}: {shown}{more}")

    def load_image(self, i: int) -> Image.Image:
        """Row ``i`` as an RGB PIL image; an undecodable file raises :class:`DatasetError` naming its path."""
        if self.root is None:
            if self.builtin_image is None:
                raise DatasetError(f"{self.dataset} has no files and no built-in images")
            return self.builtin_image(self.ids[i])
        return decode_image(self.path(i))
