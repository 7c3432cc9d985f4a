"""A researcher's first hour: one vocabulary across commands, quiet output, a store xarray opens as is."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from diffeat.cli import main
from diffeat.extract import extract
from diffeat.store import open_store

from layouts import write_image


def test_probe_and_cka_after_an_imagefolder_extract_need_no_split(tmp_path):
    root = tmp_path / "folder"
    for k in range(24):  # train/ and val/, two classes
        write_image(root / ("train" if k % 3 else "val") / f"c{k % 2}" / f"{k}.jpg", k)
    store = str(tmp_path / "f.zarr")
    extract(dataset="imagefolder", root=str(root), model="random:tiny", blocks=[3], ts=[50], store=store,
            device="cpu", batch_size=8, num_workers=0)
    assert open_store(store).splits("imagefolder") == ["train", "val"]
    out = CliRunner().invoke(main, ["probe", "--store", store, "--dataset", "imagefolder", "--head", "knn",
                                    "--out", str(tmp_path / "r"), "--json"])
    assert out.exit_code == 0, out.output
    run = next((tmp_path / "r").iterdir())
    config = json.loads((run / "run.json").read_text())["config"]
    assert (config["train_split"], config["test_split"]) == ("train", "val")
    out = CliRunner().invoke(main, ["cka", "--store", store, "--dataset", "imagefolder", "--block", "3",
                                    "--t", "50", "--pool", "1", "--json"])
    assert out.exit_code == 0, out.output  # --block, like extract and probe; the split is the test split, val
    wrong = CliRunner().invoke(main, ["probe", "--store", store, "--dataset", "imagefolder", "--test-split", "test"])
    assert wrong.exit_code == 1 and "stored for split(s) train, val" in wrong.output


def test_xarray_opens_a_setting_with_sample_ids_and_no_warning(tmp_path):
    import xarray as xr

    store = tmp_path / "s.zarr"
    report = extract(dataset="digits", model="random:tiny", blocks=[3], ts=[50], store=str(store), device="cpu",
                     splits=["test"], limit=40)
    setting = store / report.settings[0].path.rsplit("/", 1)[0]
    table = next(p for p in (store / "datasets" / "digits" / "test").iterdir() if p.is_dir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = xr.open_zarr(setting)
        labels = xr.open_zarr(table)
    assert feats.data.dims == ("sample", "channel", "y", "x")
    ids = open_store(str(store)).sample_table("digits", "test")[0]
    assert list(feats.sample.values) == list(ids)
    both = xr.merge([feats.data, labels.label])  # joined on the sample ids
    assert int(both.label.sel(sample=ids[7]).values) == open_store(str(store)).sample_table("digits", "test")[1][7]
    assert not [p for p in store.iterdir() if "writetest" in p.name]  # the write check leaves nothing behind


def test_ids_lists_rows_in_feature_order_and_import_can_start_a_store(tmp_path):
    store = str(tmp_path / "s.zarr")
    table = CliRunner().invoke(main, ["ids", "--dataset", "digits", "--split", "test"])
    assert table.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(table.output)))
    assert len(rows) == 360 and rows[0]["id"] == "digits-0000" and rows[1]["row"] == "1"
    # Features computed elsewhere, in that row order, go into a store where nothing was extracted yet.
    np.save(tmp_path / "x.npy", np.arange(360 * 4, dtype=np.float32).reshape(360, 4))
    out = CliRunner().invoke(main, ["import", str(tmp_path / "x.npy"), "--store", store, "--dataset", "digits",
                                    "--split", "test", "--name", "ext"])
    assert out.exit_code == 0, out.output
    from_store = CliRunner().invoke(main, ["ids", "--store", store, "--dataset", "digits", "--json"])
    assert [r["id"] for r in json.loads(from_store.output)] == [r["id"] for r in rows]
    features = open_store(store).open_features(dataset="digits", split="test", name="ext")
    assert features.load()[5, 0] == 20.0


def test_dry_run_runs_the_stage_checks_and_creates_nothing(tmp_path):
    pipeline = tmp_path / "p.yaml"
    store = tmp_path / "s.zarr"
    pipeline.write_text(f"name: t\ndefaults: {{dataset: digits, store: {store}}}\n"
                        "stages:\n  extract:\n    model: digits-ddpm\n    matrix: {block: [15], t: [50]}\n")
    out = CliRunner().invoke(main, ["run", str(pipeline), "--dry-run"])
    assert out.exit_code == 1 and "stage extract: --block 15 does not exist: this model has blocks 1..13" in out.output
    pipeline.write_text(pipeline.read_text().replace("[15]", "[3]").replace("t: [50]", "t: [5000]"))
    out = CliRunner().invoke(main, ["run", str(pipeline), "--dry-run"])
    assert out.exit_code == 1 and "--t 5000 is out of range" in out.output
    assert not store.exists()


def test_demo_out_folder_named_like_the_pipeline(tmp_path, monkeypatch):
    """`diffeat demo --out demo` makes ./demo; the next run must still find the built-in pipeline."""
    from diffeat.pipelines import load_pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_pipeline("demo").name == "demo"


def test_demo_console_is_a_few_lines(tmp_path):
    code = ("import sys; from diffeat.cli import main; sys.argv = ['diffeat', 'demo', '--out', sys.argv[1]]; "
            "main()")
    overrides = tmp_path / "d"
    # A small demo (two blocks, one t) through the real command, output as a user sees it off a terminal.
    env_code = code.replace("main()", "from diffeat.pipelines import demo as d; "
                            "orig = d.run_demo; d.run_demo = lambda out, **kw: orig(out, **{**kw, 'overrides': "
                            "{**kw.get('overrides', {}), 'blocks': [4, 9], 'ts': [50], 'defaults.limit': 120}}); "
                            "main()")
    proc = subprocess.run([sys.executable, "-c", env_code, str(overrides)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) < 20, lines
    assert lines[-2].startswith("best: block") and Path(overrides / "summary.md").is_file()


def test_ids_from_the_dataset_when_the_store_holds_none_of_it(tmp_path):
    """A store without the dataset's tables: `ids` reads a built-in dataset itself, and names --root for others."""
    from diffeat.data import open_dataset
    from diffeat.store.imports import sample_rows

    store = tmp_path / "empty.zarr"
    open_store(str(store), mode="a")
    rows = sample_rows("digits", [], store=str(store))
    digits = open_dataset("digits", None)
    want = [s for s in digits.standard_splits]
    assert [r["split"] for r in rows] == [s for s in want for _ in range(len(digits.samples(s)))]
    assert [r["id"] for r in rows if r["split"] == want[0]] == list(digits.samples(want[0]).ids)
    result = CliRunner().invoke(main, ["ids", "--store", str(store), "--dataset", "cub"])
    assert result.exit_code == 1 and "cub needs a root folder (--root)" in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
