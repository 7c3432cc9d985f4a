"""Images that cannot be decoded, 16-bit images, decompression bombs, and a dataset root one level too high.

Issue 16: one undecodable image ended a whole extraction with a DataLoader worker's traceback. Now
it is one line naming the file (finished units kept), or, with ``--on-bad-image skip``, a NaN row
recorded with its id and reason that probe and CKA leave out with a warning that counts them.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from layouts import write_cub
from PIL import Image

from diffeat.cli import main
from diffeat.data import open_dataset
from diffeat.data.images import decode_image
from diffeat.errors import DatasetError
from diffeat.store import open_store

ARGS = ["--dataset", "cub", "--model", "random:tiny", "--block", "3", "--t", "90", "--chunk-rows", "4",
        "--device", "cpu", "--batch-size", "4", "--num-workers", "1"]  # a loader worker: errors cross a process


@pytest.fixture
def broken_cub(tmp_path) -> tuple[Path, list[str], list[Path]]:
    """CUB with 16 train and 16 test images, three train images broken (zero bytes, truncated, garbage)."""
    root = write_cub(tmp_path / "data", n_classes=4, per_class=8)
    table = open_dataset("cub", root).samples("train")
    rows = [5, 9, 14]  # past the first unit, so a failing run keeps finished units
    paths = [root / table.relpaths[r] for r in rows]
    paths[0].write_bytes(b"")
    paths[1].write_bytes(paths[1].read_bytes()[:200])
    paths[2].write_bytes(b"not an image at all" * 20)
    return root, [table.ids[r] for r in rows], paths


def test_a_bad_image_fails_in_one_line_naming_the_file_and_keeps_finished_units(broken_cub, tmp_path):
    root, _, paths = broken_cub
    store = tmp_path / "feats.zarr"
    result = CliRunner().invoke(main, ["extract", *ARGS, "--root", str(root), "--store", str(store),
                                       "--split", "train"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and str(paths[0]) in errors[0] and "--on-bad-image skip" in errors[0]
    assert "Traceback" not in result.output and "DataLoader worker" not in result.output
    (setting,) = open_store(str(store)).list_settings()
    assert setting.status == "in_progress"
    flags = sorted(p.name for p in (store / setting.path).parent.glob("done/c/*"))
    assert flags == ["0"]  # rows 0-3 were finished and kept


def test_skip_writes_nan_rows_records_them_and_probe_and_cka_leave_them_out(broken_cub, tmp_path, caplog):
    root, bad_ids, paths = broken_cub
    store = str(tmp_path / "feats.zarr")
    result = CliRunner().invoke(main, ["extract", *ARGS, "--root", str(root), "--store", store,
                                       "--on-bad-image", "skip", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert sorted(s["id"] for s in report["skipped"]) == sorted(bad_ids)
    assert all(str(p) in s["reason"] for s, p in zip(sorted(report["skipped"], key=lambda s: s["row"]), paths))
    assert {s["outcome"] for s in report["settings"]} == {"written"}

    fs = open_store(store)
    train = fs.open_features(dataset="cub", split="train", block=3, t=90, pool=1)
    assert sorted(r["id"] for r in train.attrs["skipped"]) == sorted(bad_ids)  # the setting's provenance
    values = train.load()
    assert np.isnan(values[[5, 9, 14]]).all() and not np.isnan(np.delete(values, [5, 9, 14], axis=0)).any()
    assert {s.settings_hash: s for s in fs.list_settings()}  # ls still reads the catalog
    entry = json.loads(next(Path(store).glob(f"_catalog/{train.info.settings_hash}.json")).read_text())
    assert entry["skipped"] == 3
    assert CliRunner().invoke(main, ["verify", "--store", store]).exit_code == 0  # recorded NaN rows are not damage

    with caplog.at_level(logging.WARNING):
        probed = CliRunner().invoke(main, ["probe", "--store", store, "--dataset", "cub", "--head", "knn",
                                           "--out", str(tmp_path / "results"), "--device", "cpu", "--json"])
    assert probed.exit_code == 0, probed.output
    (row,) = json.loads(probed.output)
    assert row["n_train"] == 16 - 3
    assert any("leaving out 3 rows" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cka = CliRunner().invoke(main, ["cka", "--store", store, "--dataset", "cub", "--split", "train",
                                        "--a", "block=3,t=90,pool=1", "--b", "block=3,t=90,pool=1", "--json"])
    assert cka.exit_code == 0, cka.output
    assert json.loads(cka.output)["n"] == 13 and json.loads(cka.output)["cka"] == pytest.approx(1.0)
    assert any("leaving out 3 rows" in r.getMessage() for r in caplog.records)


def test_16_bit_png_is_converted_by_its_bit_depth(tmp_path):
    """Issue 16: 99.6% of the pixels of a 16-bit PNG became 255."""
    levels = np.arange(64 * 64, dtype=np.int64).reshape(64, 64) % 256
    path = tmp_path / "deep.png"
    Image.fromarray((levels * 257).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    decoded = np.asarray(decode_image(path))
    assert decoded.dtype == np.uint8 and decoded.shape == (64, 64, 3)
    np.testing.assert_array_equal(decoded[..., 0], levels)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width``×``height`` and holds (almost) no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size", [(20000, 20000), (16000, 9000)])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, size):
    path = _png_header_only(tmp_path / "bomb.png", *size)
    with pytest.raises(DatasetError, match=r"bomb\.png .*(refused before decoding|decompression bomb)") as e:
        decode_image(path)
    assert "\n" not in str(e.value)


def test_a_root_above_the_dataset_names_the_one_missing_file(tmp_path):
    """Issue 16: pointing at the parent of CUB_200_2011 with one file missing listed all five as missing."""
    base = write_cub(tmp_path, n_classes=2, per_class=2)
    (base / "classes.txt").unlink()
    with pytest.raises(DatasetError) as e:
        open_dataset("cub", tmp_path)
    first = str(e.value).splitlines()[0]
    assert f"{base} is missing classes.txt." in first and "images.txt" not in first


def test_skip_on_the_latent_path_too(broken_cub, pipeline_dirs, tmp_path):
    """A latent model's loader (image and noise, the VAE on the extract device) marks bad images the same way."""
    from diffeat.extract import extract

    root, bad_ids, _ = broken_cub
    report = extract(dataset="cub", root=str(root), model=str(pipeline_dirs["sd"]), blocks=[5], ts=[90], pools=[1],
                     store=str(tmp_path / "latent.zarr"), splits=["train"], batch_size=4, device="cpu",
                     num_workers=1, store_dtype="float32", on_bad_image="skip")
    assert sorted(s["id"] for s in report.skipped) == sorted(bad_ids)
    features = open_store(str(tmp_path / "latent.zarr")).open_features(dataset="cub", split="train", block=5, t=90,
                                                                        pool=1)
    values = features.load()
    assert np.isnan(values[[5, 9, 14]]).all() and np.isfinite(np.delete(values, [5, 9, 14], axis=0)).all()
    assert sorted(features.skipped.tolist()) == [5, 9, 14]
