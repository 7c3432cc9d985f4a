"""Tiny synthetic datasets in each official on-disk layout, for tests.

Each ``write_<layout>(root, ...)`` writes real image files (PIL) and real
annotation files (text, or .mat via ``scipy.io.savemat`` with the official
variable names, shapes and struct fields) under ``root`` and returns the path to
pass to ``open_dataset``. Image ``k`` of a layout has a distinct flat colour
(``color(k)``) so a test can tell which file was decoded. Where a real dataset has
a quirk a reader must handle (1-based or sparse labels, files joined on id and
not on line order, names with spaces, repeated file names), the tiny one has it too.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

#: (width, height) of the synthetic images unless a writer is told otherwise.
SIZE = (48, 40)


def color(k: int) -> tuple[int, int, int]:
    """The flat RGB colour of synthetic image ``k`` (distinct for k < 256, JPEG-robust in the red channel)."""
    return (k * 37 % 256, 255 - k * 11 % 256, 100)


def write_image(path: Path, k: int, size: tuple[int, int] = SIZE) -> Path:
    """Write a flat-colour image (format from the suffix: JPEG for .jpg/.JPEG, PNG for .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.new("RGB", size, color(k)).save(path, **options)
    return path


def _lines(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in rows), encoding="utf-8")


def write_cub(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = SIZE) -> Path:
    """CUB_200_2011 under ``root/CUB_200_2011`` (returned). Image ids 1..N, class ids 1..n_classes.

    Image ``k`` of a class is train when k is even. The label and split files are
    written in reverse id order, so a reader joining on line order gets it wrong.
    """
    base = root / "CUB_200_2011"
    classes = [f"{c:03d}.Bird_{c}" for c in range(1, n_classes + 1)]
    images, labels, split = [], [], []
    image_id = 0
    for c, name in enumerate(classes, start=1):
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/Bird_{c}_{image_id:04d}.jpg"
            write_image(base / "images" / rel, image_id, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", labels[::-1])
    _lines(base / "train_test_split.txt", split[::-1])
    _lines(base / "classes.txt", [f"{c} {n}" for c, n in enumerate(classes, start=1)])
    return base


#: Sparse NABirds-like class ids that have images; their numeric order differs from their string order.
NABIRDS_CLASS_IDS = (99, 300, 1000)


def nabirds_uuid(k: int) -> str:
    """The (deterministic) UUID image id of synthetic NABirds image ``k``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"nabirds/{k}"))


def write_nabirds(root: Path, per_class: int = 4, size: tuple[int, int] = SIZE) -> Path:
    """NABirds under ``root/nabirds`` (returned): UUID image ids, sparse class ids ``NABIRDS_CLASS_IDS``.

    ``classes.txt`` also lists taxonomy nodes (0, 1, 2, 301) that have no images, as the real file does.
    """
    base = root / "nabirds"
    names = {0: "Birds", 1: "Perching Birds", 2: "Hummingbirds", 301: "Unused leaf"}
    names.update({c: f"Species {c} (Adult Male)" for c in NABIRDS_CLASS_IDS})
    images, labels, split = [], [], []
    k = 0
    for c in NABIRDS_CLASS_IDS:
        for j in range(per_class):
            k += 1
            image_id = nabirds_uuid(k)
            rel = f"{c:04d}/{image_id.replace('-', '')}.jpg"
            write_image(base / "images" / rel, k, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(j % 2 == 0)}")
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", labels)
    _lines(base / "train_test_split.txt", split)
    _lines(base / "classes.txt", [f"{c} {n}" for c, n in sorted(names.items())])
    return base


def write_flowers(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = SIZE,
                  names: bool = False) -> Path:
    """Oxford Flowers-102 under ``root/flowers-102`` (returned).

    Image k (1-based) has label ((k-1) % n_classes) + 1; its "round" (k-1) // n_classes
    puts it in trnid (round 0), valid (round 1) or tstid (later rounds). With ``names``
    a ``cat_to_name.json`` maps "1".. to "flower 1"...
    """
    base = root / "flowers-102"
    n = n_classes * per_class
    labels = np.array([[(k - 1) % n_classes + 1 for k in range(1, n + 1)]], dtype=np.float64)  # 1×N double
    for k in range(1, n + 1):
        write_image(base / "jpg" / f"image_{k:05d}.jpg", k, size)
    rounds = {k: (k - 1) // n_classes for k in range(1, n + 1)}
    setid = {var: np.array([[k for k, r in rounds.items() if pick(r)]], dtype=np.uint16)
             for var, pick in (("trnid", lambda r: r == 0), ("valid", lambda r: r == 1), ("tstid", lambda r: r > 1))}
    savemat(base / "imagelabels.mat", {"labels": labels})
    savemat(base / "setid.mat", setid)
    if names:
        (base / "cat_to_name.json").write_text(json.dumps({str(c): f"flower {c}" for c in range(1, n_classes + 1)}))
    return base


#: Aircraft variant names as in variants.txt (spaces and slashes included).
AIRCRAFT_VARIANTS = ("707-320", "Cessna 172", "F/A-18", "DHC-8-100", "Boeing 717")


def aircraft_id(k: int) -> str:
    """The 7-digit image id of synthetic aircraft image ``k`` (with leading zeros, as real ids have)."""
    return f"{k * 1013:07d}"


def write_aircraft(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = SIZE) -> Path:
    """FGVC-Aircraft 2013b under ``root/fgvc-aircraft-2013b`` (returned; it holds ``data/``).

    Per class: image 0 -> train, 1 -> val, the rest -> test; trainval = train then val lines.
    """
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = AIRCRAFT_VARIANTS[:n_classes]
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    k = 0
    for variant in variants:
        for j in range(per_class):
            k += 1
            write_image(data / "images" / f"{aircraft_id(k)}.jpg", k, size)
            rows["train" if j == 0 else "val" if j == 1 else "test"].append(f"{aircraft_id(k)} {variant}")
    rows["trainval"] = rows["train"] + rows["val"]
    for split, lines in rows.items():
        _lines(data / f"images_variant_{split}.txt", lines)
    _lines(data / "variants.txt", list(variants))
    return data.parent


def _cars_annotations(fnames: list[str], classes: list[int] | None) -> np.ndarray:
    """A 1×N MATLAB struct array like the devkit's ``annotations`` (no ``class`` field when ``classes`` is None)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if classes is not None else []) + ["fname"]
    annos = np.empty((1, len(fnames)), dtype=[(f, object) for f in fields])
    for i, fname in enumerate(fnames):
        values = [np.array([[v]], dtype=np.uint16) for v in (2, 3, 30, 25)]
        if classes is not None:
            values.append(np.array([[classes[i]]], dtype=np.uint8))
        annos[0, i] = tuple(values) + (np.array([fname]),)
    return annos


def write_cars(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = SIZE,
               test_labels_in_devkit: bool = False, kaggle_folders: bool = False) -> Path:
    """Stanford Cars under ``root/stanford_cars`` (returned): devkit .mat files, cars_train/, cars_test/.

    Both image folders use the names 00001.jpg, ... (as the real ones do). Per class
    half the images are train. The labelled test annotations go in the root (or in
    devkit/ with ``test_labels_in_devkit``); ``kaggle_folders`` nests images as
    cars_train/cars_train/ like the Kaggle mirror. Class c is named "Car c 2012".
    """
    base = root / "stanford_cars"
    class_names = np.empty((1, n_classes), dtype=object)
    class_names[0, :] = [f"Car {c} 2012" for c in range(1, n_classes + 1)]
    files: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    k = 0
    for c in range(1, n_classes + 1):
        for j in range(per_class):
            k += 1
            split = "train" if j < per_class // 2 else "test"
            fnames, classes = files[split]
            fname = f"{len(fnames) + 1:05d}.jpg"
            folder = base / f"cars_{split}" / (f"cars_{split}" if kaggle_folders else "")
            write_image(folder / fname, k, size)
            fnames.append(fname)
            classes.append(c)
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": class_names})
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": _cars_annotations(*files["train"])})
    savemat(base / "devkit" / "cars_test_annos.mat", {"annotations": _cars_annotations(files["test"][0], None)})
    labelled = base / ("devkit" if test_labels_in_devkit else "") / "cars_test_annos_withlabels.mat"
    savemat(labelled, {"annotations": _cars_annotations(*files["test"])})
    return base


#: Synthetic Stanford Dogs breed folders (synset-breed), in label order.
DOG_BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog", "n02086079-Pekinese")


def write_dogs(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = SIZE) -> Path:
    """Stanford Dogs under ``root/stanford_dogs`` (returned): Images/<breed>/, lists/{train,test}_list.mat.

    Per breed the first half of the images is train. Lists hold ``file_list``,
    ``annotation_list`` (N×1 cells) and ``labels`` (N×1 double, 1-based), like the real ones.
    """
    base = root / "stanford_dogs"
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    k = 0
    for label, breed in enumerate(DOG_BREEDS[:n_classes], start=1):
        synset = breed.split("-")[0]
        for j in range(per_class):
            k += 1
            rel = f"{breed}/{synset}_{1000 + k}.jpg"
            write_image(base / "Images" / rel, k, size)
            lists["train" if j < per_class // 2 else "test"].append((rel, label))
    (base / "lists").mkdir(parents=True)
    for split, rows in lists.items():
        file_list = np.empty((len(rows), 1), dtype=object)
        file_list[:, 0] = [r for r, _ in rows]
        annotation_list = np.empty((len(rows), 1), dtype=object)
        annotation_list[:, 0] = [r.removesuffix(".jpg") for r, _ in rows]
        labels = np.array([[float(lab)] for _, lab in rows])
        savemat(base / "lists" / f"{split}_list.mat",
                {"file_list": file_list, "annotation_list": annotation_list, "labels": labels})
    return base


def write_imagefolder(root: Path, size: tuple[int, int] = SIZE) -> Path:
    """``root/imagefolder`` (returned) with train/ (classes ant, bee, cat) and test/ (ant, cat: no bee).

    File names repeat between splits; cat/ holds a nested folder and a PNG; a
    README.txt and a hidden file are not images and must be ignored.
    """
    base = root / "imagefolder"
    k = 0
    for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("ant", "cat"))):
        for name in classes:
            for j in range(2):
                k += 1
                write_image(base / split / name / f"{j}.jpg", k, size)
    write_image(base / "train" / "cat" / "more" / "2.png", 99, size)
    (base / "train" / "cat" / "README.txt").write_text("not an image")
    (base / "train" / "cat" / ".hidden.jpg").write_bytes(b"")
    return base


#: Synthetic ImageNet wnids, sorted.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")


def write_imagenet(root: Path, per_class: int = 2, size: tuple[int, int] = SIZE) -> Path:
    """ImageNet under ``root/imagenet`` (returned): train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_*.JPEG."""
    base = root / "imagenet"
    k = 0
    for wnid in WNIDS:
        for j in range(per_class):
            k += 1
            write_image(base / "train" / wnid / f"{wnid}_{100 + j}.JPEG", k, size)
            write_image(base / "val" / wnid / f"ILSVRC2012_val_{k:08d}.JPEG", 200 + k, size)
    return base


def write_wnid_list(path: Path, wnids: list[str]) -> Path:
    """A class list in SCAN's imagenet_50.txt format: '<wnid> <name>' per line."""
    _lines(path, [f"{w} class of {w}" for w in wnids])
    return path
