"""Dataset readers: every official layout, written as a tiny real tree by tests/layouts.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from layouts import (
    AIRCRAFT_VARIANTS,
    DOG_BREEDS,
    NABIRDS_CLASS_IDS,
    WNIDS,
    aircraft_id,
    color,
    nabirds_uuid,
    write_aircraft,
    write_cars,
    write_cub,
    write_dogs,
    write_flowers,
    write_imagefolder,
    write_imagenet,
    write_nabirds,
    write_wnid_list,
)
from PIL import Image
from scipy.io import savemat

from diffeat.data import DATASETS, DatasetLayout, SampleTable, open_dataset, preprocess
from diffeat.errors import DatasetError


def decoded_k(image: Image.Image) -> int:
    """Which synthetic image (``layouts.color(k)``) this decoded image is."""
    pixel = np.asarray(image, dtype=np.int64)[image.height // 2, image.width // 2]
    return min(range(256), key=lambda k: int(np.abs(pixel - np.array(color(k))).sum()))


def by_block(k: int) -> int:
    """Writers that give each class 4 consecutive images: class of image k (1-based)."""
    return (k - 1) // 4


def by_folder(table: SampleTable, i: int) -> str:
    """Folder layouts: the class folder the file sits in."""
    return table.relpaths[i].split("/")[1]


# layout -> (writer, split sizes, class of decoded image k); None: class read from the folder instead.
LAYOUTS: dict[str, tuple[Callable[[Path], Path] | None, dict[str, int], Callable[[int], int] | None]] = {
    "cub": (write_cub, {"train": 6, "test": 6}, by_block),
    "nabirds": (write_nabirds, {"train": 6, "test": 6}, by_block),
    "flowers": (write_flowers, {"train": 3, "val": 3, "trainval": 6, "test": 6}, lambda k: (k - 1) % 3),
    "aircraft": (write_aircraft, {"train": 3, "val": 3, "trainval": 6, "test": 6}, by_block),
    "cars": (write_cars, {"train": 6, "test": 6}, by_block),
    "dogs": (write_dogs, {"train": 6, "test": 6}, by_block),
    "imagefolder": (write_imagefolder, {"train": 7, "test": 4}, None),
    "imagenet": (write_imagenet, {"train": 8, "val": 8}, None),
    "digits": (None, {"train": 1437, "test": 360}, None),
}


def test_every_registered_layout_is_tested() -> None:
    assert set(LAYOUTS) == set(DATASETS)


def open_layout(name: str, tmp_path: Path) -> DatasetLayout:
    writer = LAYOUTS[name][0]
    return open_dataset(name, writer(tmp_path) if writer else None)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_tables_are_consistent(name: str, tmp_path: Path) -> None:
    _, sizes, class_of_k = LAYOUTS[name]
    ds = open_layout(name, tmp_path)
    assert set(ds.splits) == set(sizes)
    assert set(ds.standard_splits) <= set(ds.splits)
    tables = {split: ds.samples(split) for split in ds.splits}
    assert {s: len(t) for s, t in tables.items()} == sizes
    class_names = {t.class_names for t in tables.values()}
    assert len(class_names) == 1  # the same classes (and so the same labels) in every split
    rows: dict[str, tuple[str, int]] = {}
    for split, table in tables.items():
        assert (table.dataset, table.split) == (name, split)
        assert table.labels.dtype == np.int64 and table.labels.min() >= 0
        assert table.labels.max() < len(table.class_names)
        table.check_files()
        for sid, rel, label in zip(table.ids, table.relpaths, table.labels.tolist()):
            # An id names one file with one label in every split it is in; different files, different ids.
            assert rows.setdefault(sid, (rel, label)) == (rel, label)
            if table.root is not None:
                assert not Path(rel).is_absolute() and ".." not in rel.split("/")
        if name == "digits":
            continue  # checked pixel by pixel in test_digits_images_are_the_sklearn_digits
        for i in range(len(table)):
            image = table.load_image(i)
            assert image.mode == "RGB" and image.size == (48, 40)
            if class_of_k is not None:
                assert table.labels[i] == class_of_k(decoded_k(image)), (split, table.relpaths[i])
            else:
                assert table.class_names[table.labels[i]] == by_folder(table, i)
    if name != "digits":
        assert len({rel for rel, _ in rows.values()}) == len(rows)


# --- per-layout specifics -------------------------------------------------------------------------------------


def test_cub_joins_on_image_id_and_accepts_the_parent_folder(tmp_path: Path) -> None:
    base = write_cub(tmp_path)  # label and split files are in reverse order: line order would be wrong
    ds = open_dataset("cub", tmp_path)  # the parent of CUB_200_2011/
    assert ds.root == base
    train = ds.samples("train")
    assert train.ids == ("1", "3", "5", "7", "9", "11")
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.class_names == ("001.Bird_1", "002.Bird_2", "003.Bird_3")
    assert train.relpaths[0] == "images/001.Bird_1/Bird_1_0001.jpg"


def test_nabirds_maps_sparse_class_ids_with_images_in_numeric_order(tmp_path: Path) -> None:
    ds = open_dataset("nabirds", write_nabirds(tmp_path))
    table = ds.samples("test")
    # numeric order 99 < 300 < 1000 (string order would put 1000 first); taxonomy nodes without images are dropped
    assert table.class_names == tuple(f"Species {c} (Adult Male)" for c in NABIRDS_CLASS_IDS)
    assert table.ids[0] == nabirds_uuid(2)


def test_flowers_splits_and_class_names(tmp_path: Path) -> None:
    ds = open_dataset("flowers", write_flowers(tmp_path, names=True))
    assert ds.standard_splits == ("trainval", "test")  # the paper trains on train+val
    train, val, trainval = ds.samples("train"), ds.samples("val"), ds.samples("trainval")
    assert trainval.ids == train.ids + val.ids
    assert train.ids == ("image_00001", "image_00002", "image_00003")
    assert train.class_names == ("flower 1", "flower 2", "flower 3")


def test_flowers_default_class_names_and_incomplete_name_file(tmp_path: Path) -> None:
    root = write_flowers(tmp_path)
    assert open_dataset("flowers", root).samples("test").class_names == ("class_001", "class_002", "class_003")
    (root / "cat_to_name.json").write_text(json.dumps({"1": "a", "3": "c"}))
    with pytest.raises(DatasetError, match=r"cat_to_name\.json has no name for class 2"):
        open_dataset("flowers", root).samples("test")


def test_aircraft_roots_ids_and_trainval(tmp_path: Path) -> None:
    base = write_aircraft(tmp_path)
    hashes = {open_dataset("aircraft", r).samples("test").manifest_sha256() for r in (tmp_path, base, base / "data")}
    assert len(hashes) == 1  # parent, fgvc-aircraft-2013b/ and data/ all resolve to the same dataset
    ds = open_dataset("aircraft", base)
    assert ds.standard_splits == ("trainval", "test")
    train = ds.samples("train")
    assert train.ids[0] == aircraft_id(1) == "0001013"  # leading zeros kept: ids are strings
    assert train.class_names == AIRCRAFT_VARIANTS[:3]
    assert ds.samples("trainval").ids == train.ids + ds.samples("val").ids


def test_cars_repeated_file_names_get_distinct_ids(tmp_path: Path) -> None:
    ds = open_dataset("cars", write_cars(tmp_path))
    train, test = ds.samples("train"), ds.samples("test")
    assert train.relpaths[0] == "cars_train/00001.jpg" and test.relpaths[0] == "cars_test/00001.jpg"
    assert not set(train.ids) & set(test.ids)
    assert train.class_names == ("Car 1 2012", "Car 2 2012", "Car 3 2012")


@pytest.mark.parametrize("in_devkit, kaggle", [(True, False), (False, True)])
def test_cars_test_labels_location_and_kaggle_folders(tmp_path: Path, in_devkit: bool, kaggle: bool) -> None:
    ds = open_dataset("cars", write_cars(tmp_path, test_labels_in_devkit=in_devkit, kaggle_folders=kaggle))
    test = ds.samples("test")
    test.check_files()
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.ids[0] == "cars_test/00001"  # the id does not depend on the mirror's folder nesting


def test_cars_without_test_labels(tmp_path: Path) -> None:
    root = write_cars(tmp_path)
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"cars_test_annos_withlabels\.mat"):
        open_dataset("cars", root).samples("test")


def test_dogs_class_names_are_breed_folders(tmp_path: Path) -> None:
    table = open_dataset("dogs", write_dogs(tmp_path)).samples("test")
    assert table.class_names == DOG_BREEDS[:3]
    assert table.ids[0] == "n02085620_1003"


def test_imagefolder_labels_agree_between_splits(tmp_path: Path) -> None:
    ds = open_dataset("imagefolder", write_imagefolder(tmp_path))
    assert ds.standard_splits == ("train", "test")
    test = ds.samples("test")  # has no bee/: cat keeps label 2
    assert test.class_names == ("ant", "bee", "cat")
    assert test.labels.tolist() == [0, 0, 2, 2]
    train = ds.samples("train")
    assert "train/cat/more/2.png" in train.relpaths  # nested folders and PNGs count
    assert not any(r.endswith((".txt", ".hidden.jpg")) for r in train.relpaths)
    assert train.ids[0] == "train/ant/0.jpg" and test.ids[0] == "test/ant/0.jpg"


def test_imagefolder_split_names_and_flat_folders(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path)
    shutil.move(root / "test", root / "holdout")
    with pytest.raises(DatasetError, match="cannot tell the train and test splits"):
        open_dataset("imagefolder", root).standard_splits
    assert len(open_dataset("imagefolder", root).samples("holdout")) == 4  # explicit splits still work
    with pytest.raises(DatasetError, match="holds images but no class folders"):
        open_dataset("imagefolder", root / "train")  # pointed one level too low: train/CLASS/image


def test_imagenet_class_list_restricts_and_orders(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    classes = write_wnid_list(tmp_path / "imagenet_50.txt", [WNIDS[2], WNIDS[0]])
    ds = open_dataset("imagenet", root, classes=classes)
    assert ds.standard_splits == ("train", "val")
    train, val = ds.samples("train"), ds.samples("val")
    assert train.class_names == val.class_names == (WNIDS[2], WNIDS[0])
    assert train.ids == (f"{WNIDS[2]}_100", f"{WNIDS[2]}_101", f"{WNIDS[0]}_100", f"{WNIDS[0]}_101")
    assert train.labels.tolist() == [0, 0, 1, 1]
    # A subset shares ids (and so noise) with the full dataset.
    full = open_dataset("imagenet", root).samples("val")
    assert set(val.ids) < set(full.ids)


def test_imagenet_bad_class_lists(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    unknown = write_wnid_list(tmp_path / "unknown.txt", [WNIDS[0], "n09999999"])
    with pytest.raises(DatasetError, match=r"unknown\.txt:2: wnid n09999999 has no folder"):
        open_dataset("imagenet", root, classes=unknown).samples("train")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{WNIDS[0]} tench\n\ngoldfish n01443537\n")
    with pytest.raises(DatasetError, match=r"bad\.txt:3: malformed line .*'goldfish' is not a WordNet id"):
        open_dataset("imagenet", root, classes=bad).samples("train")
    with pytest.raises(DatasetError, match=r"missing file .*nope\.txt"):
        open_dataset("imagenet", root, classes=tmp_path / "nope.txt").samples("train")


def test_imagenet_flat_val_and_missing_split(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    shutil.rmtree(root / "train")
    assert len(open_dataset("imagenet", root).samples("val")) == 8
    with pytest.raises(DatasetError, match=r"imagenet split 'train' is missing"):
        open_dataset("imagenet", root).samples("train")
    for f in list((root / "val").rglob("*.JPEG")):
        f.rename(root / "val" / f.name)
    for d in (root / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(DatasetError, match=r"val.* holds images but no wnid folders"):
        open_dataset("imagenet", root)


def test_digits_images_are_the_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    ds = open_dataset("digits")
    test = ds.samples("test")
    assert test.ids[:3] == ("digits-0000", "digits-0005", "digits-0010")
    assert test.class_names == tuple("0123456789") and test.root is None
    assert test.labels.tolist() == digits.target[::5].tolist()
    image = test.load_image(1)  # sample 5
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    expected = np.rint(digits.images[5] * 255 / 16).astype(np.uint8)
    assert (pixels[::4, ::4, 0] == expected).all() and (pixels[3::4, 3::4, 2] == expected).all()


# --- the sample table -------------------------------------------------------------------------------------------


def test_manifest_hash_is_the_documented_canonical_json(tmp_path: Path) -> None:
    table = open_dataset("cub", write_cub(tmp_path)).samples("train")
    doc = {"dataset": "cub", "split": "train", "class_names": list(table.class_names),
           "rows": [[i, r, int(lab)] for i, r, lab in zip(table.ids, table.relpaths, table.labels)]}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert table.manifest_sha256() == hashlib.sha256(canonical).hexdigest()


def test_manifest_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    table = open_dataset("cub", write_cub(tmp_path / "a")).samples("train")
    copy = open_dataset("cub", write_cub(tmp_path / "b")).samples("train")
    assert copy.root != table.root and copy.manifest_sha256() == table.manifest_sha256()  # root is not content
    labels = table.labels.copy()
    labels[0] = 1
    variants = [
        dataclasses.replace(table, labels=labels),
        dataclasses.replace(table, relpaths=("images/x.jpg",) + table.relpaths[1:]),
        dataclasses.replace(table, ids=("999",) + table.ids[1:]),
        dataclasses.replace(table, class_names=("a", "b", "c")),
        dataclasses.replace(table, split="test"),
        dataclasses.replace(table, dataset="nabirds"),
        table.head(5),
    ]
    hashes = {v.manifest_sha256() for v in variants}
    assert len(hashes) == len(variants) and table.manifest_sha256() not in hashes


def test_head_and_pickle(tmp_path: Path) -> None:
    table = open_dataset("aircraft", write_aircraft(tmp_path)).samples("test")
    head = table.head(2)
    assert head.ids == table.ids[:2] and head.labels.tolist() == table.labels[:2].tolist() and len(head) == 2
    assert table.head(100).manifest_sha256() == table.manifest_sha256()
    for t in (table, open_dataset("digits").samples("test")):
        clone = pickle.loads(pickle.dumps(t))
        assert clone.manifest_sha256() == t.manifest_sha256()
        assert np.array_equal(np.asarray(clone.load_image(1)), np.asarray(t.load_image(1)))


def test_check_files_names_missing_files(tmp_path: Path) -> None:
    table = open_dataset("dogs", write_dogs(tmp_path)).samples("train")
    for i in (1, 4):
        table.path(i).unlink()
    with pytest.raises(DatasetError, match="2 of 6 image files are missing") as err:
        table.check_files()
    assert table.relpaths[1] in str(err.value) and table.relpaths[4] in str(err.value)


@pytest.mark.parametrize("content", [b"not an image at all", b"truncated"])
def test_undecodable_image_names_its_path(tmp_path: Path, content: bytes) -> None:
    table = open_dataset("flowers", write_flowers(tmp_path)).samples("train")
    path = table.path(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == b"truncated" else content)
    with pytest.raises(DatasetError, match="cannot decode image") as err:
        table.load_image(1)
    assert str(path) in str(err.value)


def test_duplicate_sample_ids_are_refused(tmp_path: Path) -> None:
    root = write_aircraft(tmp_path)
    listing = root / "data" / "images_variant_train.txt"
    first = listing.read_text().splitlines()[0]
    listing.write_text(listing.read_text() + first + "\n")
    with pytest.raises(DatasetError, match=f"lists sample '{first.split()[0]}' more than once"):
        open_dataset("aircraft", root).samples("train")


# --- preprocessing ---------------------------------------------------------------------------------------------


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def to_array(image: Image.Image) -> np.ndarray:
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1).transpose(2, 0, 1)


def test_preprocess_matches_center_crop_arr_when_downscaling() -> None:
    image = random_image((300, 200))
    # min side 200 >= 2*64: one BOX halving to 150x100, then BICUBIC to 96x64, then the central 64 columns.
    ref = image.resize((150, 100), Image.Resampling.BOX).resize((96, 64), Image.Resampling.BICUBIC)
    ref = ref.crop((16, 0, 80, 64))
    out = preprocess(image, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_array_equal(out, to_array(ref))


def test_preprocess_upscales_and_crops_portrait_images() -> None:
    digit = open_dataset("digits").samples("train").load_image(0)
    ref = digit.resize((64, 64), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(preprocess(digit, 64), to_array(ref))
    portrait = random_image((40, 90), seed=1)
    ref = portrait.resize((32, 72), Image.Resampling.BICUBIC).crop((0, 20, 32, 52))
    np.testing.assert_array_equal(preprocess(portrait, 32), to_array(ref))


def test_preprocess_range_and_modes() -> None:
    assert preprocess(Image.new("RGB", (50, 70), (255, 255, 255)), 16).min() == 1.0
    assert preprocess(Image.new("RGB", (50, 70), (0, 0, 0)), 16).max() == -1.0
    out = preprocess(random_image((45, 45)), 32)
    assert -1.0 <= out.min() and out.max() <= 1.0
    gray = random_image((40, 40)).convert("L")
    np.testing.assert_array_equal(preprocess(gray, 16), preprocess(gray.convert("RGB"), 16))


# --- user errors -----------------------------------------------------------------------------------------------


def test_open_dataset_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--dataset 'cubb' is invalid: choose one of cub, nabirds"):
        open_dataset("cubb", tmp_path)
    with pytest.raises(DatasetError, match=r"(?s)cub needs a root folder.*images\.txt"):  # shows the expected tree
        open_dataset("cub")
    with pytest.raises(DatasetError, match="digits is built in and takes no root"):
        open_dataset("digits", tmp_path)
    with pytest.raises(DatasetError, match="only accepted by imagenet, not by cub"):
        open_dataset("cub", write_cub(tmp_path), classes=tmp_path / "x.txt")
    with pytest.raises(DatasetError, match=r"cub split 'val' is invalid: choose one of train, test"):
        open_dataset("cub", tmp_path).samples("val")


def test_missing_root_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"(?s)root .*nowhere does not exist.*cars_meta\.mat"):
        open_dataset("cars", tmp_path / "nowhere")
    root = write_cub(tmp_path)
    (root / "train_test_split.txt").unlink()
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"is missing train_test_split\.txt, classes\.txt\. cub expects"):
        open_dataset("cub", root)
    aircraft = write_aircraft(tmp_path)
    (aircraft / "data" / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*images_variant_val\.txt"):
        open_dataset("aircraft", aircraft).samples("val")


@pytest.mark.parametrize("file, line, replacement, message", [
    ("images.txt", 2, "2", r"images\.txt:2: malformed line '2' \(expected '<image_id> <path>'\)"),
    ("train_test_split.txt", 1, "12 2", r"train_test_split\.txt:1: malformed line '12 2': the flag must be 1"),
    ("image_class_labels.txt", 3, "10 three", r"image_class_labels\.txt:3: .*'three' is not an integer"),
    ("image_class_labels.txt", 3, "10 7", r"image_class_labels\.txt:3: .*class 7 is not in classes\.txt"),
    ("image_class_labels.txt", 3, "", r"image_class_labels\.txt has no line for image 10 \(images\.txt line 10\)"),
    ("classes.txt", 1, "1 001.Bird_1\n1 again", r"classes\.txt:2: .*class_id 1 already on line 1"),
])
def test_cub_malformed_lines_name_file_and_line(tmp_path: Path, file: str, line: int, replacement: str,
                                                message: str) -> None:
    root = write_cub(tmp_path)
    lines = (root / file).read_text().splitlines()
    lines[line - 1] = replacement
    (root / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        open_dataset("cub", root).samples("train")


def test_aircraft_unknown_variant_names_file_and_line(tmp_path: Path) -> None:
    root = write_aircraft(tmp_path)
    path = root / "data" / "images_variant_test.txt"
    path.write_text(path.read_text() + "0000042 Concorde\n")
    with pytest.raises(DatasetError, match=r"images_variant_test\.txt:7: .*variant 'Concorde' is not in variants"):
        open_dataset("aircraft", root).samples("test")


def test_mat_file_errors(tmp_path: Path) -> None:
    root = write_flowers(tmp_path)
    setid = {"trnid": np.array([[1, 2]]), "valid": np.array([[3]])}
    savemat(root / "setid.mat", setid)
    with pytest.raises(DatasetError, match=r"setid\.mat has no variable tstid \(it has: trnid, valid\)"):
        open_dataset("flowers", root).samples("train")
    savemat(root / "setid.mat", {**setid, "tstid": np.array([[4, 13]])})
    with pytest.raises(DatasetError, match=r"setid\.mat: tstid\[1\] = 13 is not an integer in 1\.\.12"):
        open_dataset("flowers", root).samples("test")
    (root / "imagelabels.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot read MATLAB file .*imagelabels\.mat"):
        open_dataset("flowers", root).samples("test")
    cars = write_cars(tmp_path)
    shutil.copy(cars / "devkit" / "cars_test_annos.mat", cars / "cars_test_annos_withlabels.mat")
    with pytest.raises(DatasetError, match=r"withlabels\.mat: the annotations struct has no field class"):
        open_dataset("cars", cars).samples("test")
