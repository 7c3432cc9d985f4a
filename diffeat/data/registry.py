"""The dataset registry: layout name -> reader class, and :func:`open_dataset`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffeat.data.aircraft import Aircraft
from diffeat.data.base import DatasetLayout
from diffeat.data.cars import Cars
from diffeat.data.cub import CUB, NABirds
from diffeat.data.digits import Digits
from diffeat.data.dogs import Dogs
from diffeat.data.flowers import Flowers
from diffeat.data.folders import ImageFolder, ImageNet
from diffeat.errors import DatasetError
from diffeat.runtime.checks import check_choice

#: Every dataset layout diffeat reads; a new layout is one module plus one line here.
DATASETS: dict[str, type[DatasetLayout]] = {
    "cub": CUB,
    "nabirds": NABirds,
    "flowers": Flowers,
    "aircraft": Aircraft,
    "cars": Cars,
    "dogs": Dogs,
    "imagefolder": ImageFolder,
    "imagenet": ImageNet,
    "digits": Digits,
}


def standard_pair(dataset: str, splits: Sequence[str], where: str = "") -> tuple[str, str]:
    """The (train, test) splits of ``dataset`` among ``splits``: the one rule extract, probe and CKA share.

    A known layout decides by its own standard pair (trainval/test for flowers and aircraft,
    train/val for imagenet); an imagefolder, or a dataset the registry does not know (an
    import), by folder name (train/ vs test/, val/, validation/, eval/).
    """
    layout = DATASETS.get(dataset, ImageFolder)
    pair = layout.standard_pair(list(splits)) or ImageFolder.standard_pair(list(splits))
    if pair is None:
        raise DatasetError(f"cannot tell which splits of {dataset}{f' in {where}' if where else ''} to train and test "
                           f"on (it holds: {', '.join(sorted(splits)) or 'none'}): give --train-split and "
                           "--test-split (or --split)")
    return pair


def open_dataset(name: str, root: str | Path | None = None, *, classes: str | Path | None = None) -> DatasetLayout:
    """Open dataset ``name`` from its official layout under ``root`` (never downloading anything).

    ``root`` is required except for built-in datasets (``digits``), which take
    none; ``classes`` (a wnid list file) is accepted by ``imagenet`` only. Every
    mistake raises :class:`DatasetError` saying what to pass or which file is missing.
    """
    check_choice(name, DATASETS, "--dataset", error=DatasetError)
    layout = DATASETS[name]
    if layout.builtin and root is not None:
        raise DatasetError(f"{name} is built in and takes no root (got {root})")
    if not layout.builtin and root is None:
        raise DatasetError(f"{name} needs a root folder (--root). {layout.expected()}")
    if classes is not None and not layout.accepts_classes:
        valid = [n for n, cls in DATASETS.items() if cls.accepts_classes]
        raise DatasetError(f"a classes file is only accepted by {', '.join(valid)}, not by {name}")
    return layout(root, classes=classes)
