"""Extraction end to end: real tiny models, real datasets on disk, real zarr stores."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from diffeat.cli import main
from diffeat.data import open_dataset, preprocess
from diffeat.errors import DatasetError, DiffeatError, ModelError
from diffeat.extract import extract
from diffeat.models.blocks import capture_blocks
from diffeat.models.loading import load_model
from diffeat.models.noise import q_sample, sample_noise
from diffeat.store import open_store
from layouts import write_cub


def arrays(store: str) -> dict[tuple, np.ndarray]:
    fs = open_store(store)
    return {(s.split, s.block, s.t, s.pool): np.asarray(zarr.open_array(store=fs.root.store, path=s.path)[:])
            for s in fs.list_settings()}


def test_features_are_the_pooled_block_of_the_noised_image(store_path):
    report = extract(dataset="digits", model="random:tiny", blocks=[7, 3], ts=[90], pools=[1, 2],
                     store=store_path, splits=["test"], limit=10, batch_size=4, device="cpu", store_dtype="float32")
    assert sorted((s.block, s.pool, s.outcome) for s in report.settings) == [
        (3, 1, "written"), (3, 2, "written"), (7, 1, "written"), (7, 2, "written")]
    fs = open_store(store_path)
    feats = fs.open_features(dataset="digits", split="test", block=7, t=90, pool=2)
    assert feats.array.shape == (10, 64, 2, 2) and feats.info.status == "complete"
    # Recompute row 3 by hand from the same pieces: image -> preprocess -> noise -> U-Net -> pool.
    table = open_dataset("digits").samples("test")
    x0 = torch.from_numpy(preprocess(table.load_image(3), 32))
    xt = q_sample(x0, sample_noise(table.ids[3], 90, tuple(x0.shape), seed=0), 90)
    unet = load_model("random:tiny").unet
    with torch.no_grad():
        act = capture_blocks(unet, xt[None].repeat(8, 1, 1, 1), torch.full((8,), 90), [7])[7][:1]
    want = torch.nn.functional.adaptive_avg_pool2d(act, 2)[0].numpy()
    np.testing.assert_allclose(feats.array[3], want, rtol=1e-5, atol=1e-6)
    assert list(feats.ids[:3]) == list(table.ids[:3])
    np.testing.assert_array_equal(feats.labels, table.labels[:10])
    meta = feats.attrs
    assert meta["settings"]["model"]["weights_sha256"] == load_model("random:tiny").weights_sha256
    assert meta["block_info"]["module"] == "mid_block" and meta["status"] == "complete"


def test_batch_size_does_not_change_a_bit(tmp_path):
    kwargs = dict(dataset="digits", model="random:tiny", blocks=[5, 11], ts=[50, 400], pools=[1, 4],
                  splits=["test"], limit=21, device="cpu", num_workers=0)
    extract(store=str(tmp_path / "a.zarr"), batch_size=7, **kwargs)
    extract(store=str(tmp_path / "b.zarr"), batch_size=32, **kwargs)
    a, b = arrays(str(tmp_path / "a.zarr")), arrays(str(tmp_path / "b.zarr"))
    assert a.keys() == b.keys() and len(a) == 8
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


def test_a_complete_setting_is_cached_and_a_new_one_is_added(store_path):
    first = extract(dataset="digits", model="random:tiny", blocks=[3], ts=[90], store=store_path,
                    splits=["test"], limit=8, device="cpu", num_workers=0)
    assert first.forwards > 0
    again = extract(dataset="digits", model="random:tiny", blocks=[3], ts=[90], store=store_path,
                    splits=["test"], limit=8, device="cpu", num_workers=0)
    assert again.forwards == 0 and again.images == 0
    assert [s.outcome for s in again.settings] == ["cached"]
    more = extract(dataset="digits", model="random:tiny", blocks=[3], ts=[90, 100], store=store_path,
                   splits=["test"], limit=8, device="cpu", num_workers=0)
    assert sorted(s.outcome for s in more.settings) == ["cached", "written"]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    # Block 11 at pool 16 has 32 KiB rows: 64-row units, so the run has many units to be killed between.
    args = ["--dataset", "digits", "--model", "random:tiny", "--block", "11", "--t", "90", "--pool", "16",
            "--split", "train", "--limit", "200", "--device", "cpu", "--batch-size", "16", "--num-workers", "0"]
    killed = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen([sys.executable, "-m", "diffeat", "-q", "extract", *args, "--store", killed])
    ledger = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list(Path(killed).glob("features/*/*/*/*/done/c/*"))
        if found:  # some units done, others not (4 units of 64 rows)
            proc.send_signal(signal.SIGKILL)
            ledger = len(found)
            break
        time.sleep(0.05)
    proc.wait()
    assert ledger is not None, "the run finished before it could be killed"
    (setting,) = open_store(killed).list_settings()
    assert setting.status == "in_progress"
    with pytest.raises(Exception, match="not complete"):
        open_store(killed).open_features(dataset="digits", split="train", block=11, t=90, pool=16)
    resumed = CliRunner().invoke(main, ["extract", *args, "--store", killed, "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["settings"][0]["outcome"] == "resumed"
    reference = str(tmp_path / "reference.zarr")
    assert CliRunner().invoke(main, ["extract", *args, "--store", reference]).exit_code == 0
    a, b = arrays(killed), arrays(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes()


def test_cub_layout_through_the_cli_with_a_model_folder(tmp_path, tiny_model_dir, store_path):
    root = write_cub(tmp_path / "CUB_200_2011", n_classes=3, per_class=4)
    result = CliRunner().invoke(main, [
        "extract", "--dataset", "cub", "--root", str(root), "--model", str(tiny_model_dir), "--block", "7",
        "--block", "9", "--t", "90", "--pool", "1", "--pool", "2", "--store", store_path,
        "--device", "cpu", "--num-workers", "1", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    listing = json.loads(CliRunner().invoke(main, ["ls", "--store", store_path, "--json"]).output)
    assert len(listing) == 8 and {e["status"] for e in listing} == {"complete"}
    entry = next(e for e in listing if (e["split"], e["block"], e["pool"]) == ("test", 9, 2))
    assert entry["model"] == "tiny-unet" and entry["dtype"] == "float16"
    arr = zarr.open_array(store=store_path, path=entry["path"], mode="r")
    assert list(arr.shape) == entry["shape"] and arr.metadata.dimension_names == ("sample", "channel", "y", "x")
    # The sample table is plain zarr (and xarray) with no diffeat needed.
    group = zarr.open_group(store_path, mode="r")
    (table,) = [g for _, g in group["datasets/cub/test"].groups()]
    ids = list(table["id"][:])
    assert ids == list(open_dataset("cub", root).samples("test").ids)
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(store_path, group=table.path, consolidated=False)
    assert list(ds["label"].dims) == ["sample"] and ds.sizes["class"] == 3


def test_an_undecodable_image_is_named_and_written_units_are_kept(tmp_path, store_path):
    root = write_cub(tmp_path / "CUB_200_2011", n_classes=2, per_class=70, size=(40, 40))
    assert len(open_dataset("cub", root).samples("train")) > 64
    table = open_dataset("cub", root).samples("train")
    bad = table.path(len(table) - 1)
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=str(bad.name)):
        extract(dataset="cub", root=str(root), model="random:tiny", blocks=[11], ts=[90], pools=[16],
                store=store_path, splits=["train"], device="cpu", num_workers=0, batch_size=8)
    (setting,) = open_store(store_path).list_settings()
    assert setting.status == "in_progress"
    done = zarr.open_array(store=store_path, path=setting.path.replace("/data", "/done"))[:]
    assert done[0] == 1 and not done.all()  # the first 64-row unit was kept, the unit with the bad image not
    Image.new("RGB", (64, 64)).save(bad, format="JPEG")
    report = extract(dataset="cub", root=str(root), model="random:tiny", blocks=[11], ts=[90], pools=[16],
                     store=store_path, splits=["train"], device="cpu", num_workers=0, batch_size=8)
    assert report.settings[0].outcome == "resumed" and report.images < len(table)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(blocks=[14]), DiffeatError, r"--block 14 does not exist.*1\.\.13"),
    (dict(ts=[1000]), DiffeatError, r"--t 1000 is out of range.*0\.\.999"),
    (dict(pools=[9]), DiffeatError, r"--pool 9 is larger than block 7's 8x8 map.*1\.\.8"),
    (dict(pools=[0]), DiffeatError, r"--pool 0 is invalid"),
    (dict(dataset="cubb"), DatasetError, r"cubb.*cub"),
    (dict(dataset="cub"), DatasetError, r"root"),
    (dict(model="/no/such/model"), ModelError, r"/no/such/model"),
    (dict(splits=["validation"]), DatasetError, r"validation.*train"),
    (dict(resolution=30), DiffeatError, r"--resolution 30"),
    (dict(dtype="float64"), DiffeatError, r"--dtype 'float64'.*bfloat16"),
])
def test_bad_input_fails_before_any_forward(kwargs, error, match, store_path):
    options = dict(dataset="digits", model="random:tiny", blocks=[7], ts=[90], pools=[1], store=store_path,
                   limit=4, device="cpu", num_workers=0)
    options.update(kwargs)
    with pytest.raises(error, match=match):
        extract(**options)
    if Path(store_path).exists():
        assert open_store(store_path).list_settings() == []


def test_class_conditional_models_are_refused(tmp_path, store_path):
    from diffeat.models.loading import ARCHITECTURES
    from diffusers import UNet2DModel

    folder = tmp_path / "cond"
    UNet2DModel(**{**ARCHITECTURES["tiny"], "num_class_embeds": 10}).save_pretrained(folder)
    with pytest.raises(ModelError, match="class-conditional"):
        extract(dataset="digits", model=str(folder), blocks=[3], ts=[90], store=store_path, limit=4, device="cpu")
