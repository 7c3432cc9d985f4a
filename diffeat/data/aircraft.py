"""FGVC-Aircraft 2013b at the variant level (100 classes), the level the paper reports.

``data/images_variant_<split>.txt`` lists ``<image_id> <variant name>`` (names may
contain spaces), ``data/variants.txt`` the 100 variant names (label = line order)
and ``data/images/<image_id>.jpg`` the images. Images keep their 20-px copyright
banner at the bottom, as torchvision's reader does.
"""

from __future__ import annotations

from functools import cached_property

from diffeat.data.base import DatasetLayout
from diffeat.data.files import malformed, read_rows
from diffeat.data.table import SampleTable
from diffeat.errors import DatasetError

_ROW = ("image_id", "variant")


class Aircraft(DatasetLayout):
    """FGVC-Aircraft 2013b, variants: train 3,334, val 3,333, trainval 6,667, test 3,333."""

    name = "aircraft"
    splits = ("train", "val", "trainval", "test")
    standard_splits = ("trainval", "test")
    required = ("variants.txt", "images")
    # The root may be fgvc-aircraft-2013b/ (holding data/), its parent, or data/ itself.
    wrappers = ("data", "fgvc-aircraft-2013b/data")
    tree = """\
fgvc-aircraft-2013b/
└── data/
    ├── variants.txt                      one variant name per line (label = line order)
    ├── images_variant_train.txt          <image_id> <variant name>
    ├── images_variant_val.txt
    ├── images_variant_trainval.txt
    ├── images_variant_test.txt
    └── images/<image_id>.jpg"""
    source = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)"

    def _read(self, split: str) -> SampleTable:
        path = self._path(f"images_variant_{split}.txt")
        if not path.is_file():
            raise DatasetError(f"missing file {path}. {self.expected()}")
        index = {name: i for i, name in enumerate(self._class_names)}
        ids, labels = [], []
        for lineno, (image_id, variant) in read_rows(path, _ROW):
            if variant not in index:
                why = f"variant {variant!r} is not in variants.txt"
                raise malformed(path, lineno, _ROW, f"{image_id} {variant}", why)
            ids.append(image_id)
            labels.append(index[variant])
        return self._table(split, ids, [f"images/{i}.jpg" for i in ids], labels, self._class_names)

    @cached_property
    def _class_names(self) -> tuple[str, ...]:
        path = self._path("variants.txt")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(names)) != len(names):
            raise DatasetError(f"{path} lists a variant twice")
        return tuple(names)
