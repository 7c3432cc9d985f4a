"""Bad input through the real command line: one `Error:` line naming what is wrong, no traceback, nothing created.

Every case of the table runs ``python -m diffeat ...`` as a subprocess (the way a user meets it:
loader worker processes, click's parsing, the exit status) and must end with exit status 1 or 2,
exactly one line holding ``Error:`` that names the file, option or name at fault, no traceback,
and no store folder (nor any new object in an existing store) left by the refused run. The
cases are the ones issue 16's fault campaign found giving tracebacks or writing where they
should not; they run a few at a time, once, and each is reported as its own test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from diffeat.errors import DiffeatError
from diffeat.extract import extract

TINY = ["--dataset", "digits", "--model", "random:tiny", "--block", "3", "--t", "90", "--split", "test",
        "--limit", "8", "--device", "cpu", "--num-workers", "0"]
LONG = "x" * 5000


@dataclass
class Case:
    """One refused command: its arguments (``{new}``: a store path that must stay absent; ``{store}``: an
    existing store that must stay unchanged; ``{tmp}``: the case's folder) and what its error line names."""

    name: str
    args: list[str]
    names: str
    files: dict[str, object] = field(default_factory=dict)  # file name in {tmp} -> content (bytes, str, array)


CASES = [
    # extract: options refused before anything is created
    Case("block-out-of-range", ["extract", *TINY, "--block", "14", "--store", "{new}"], "--block 14"),
    Case("block-range-too-long", ["extract", *TINY, "--block", "1-30000000", "--store", "{new}"], "1-30000000"),
    Case("t-out-of-range", ["extract", *TINY, "--t", "5000", "--store", "{new}"], "--t 5000"),
    Case("resolution-huge", ["extract", *TINY, "--resolution", "100000", "--store", "{new}"], "--resolution 100000"),
    Case("num-workers-negative", ["extract", *TINY, "--num-workers", "-1", "--store", "{new}"], "--num-workers -1"),
    Case("pool-too-large", ["extract", *TINY, "--pool", "99", "--store", "{new}"], "--pool 99"),
    Case("store-empty", ["extract", *TINY, "--store", ""], "--store is empty"),
    Case("store-too-long", ["extract", *TINY, "--store", "{tmp}/" + LONG], "--store"),
    Case("dataset-root-missing", ["extract", *TINY, "--dataset", "cub", "--root", "{tmp}/nowhere", "--store",
                                  "{new}"], "nowhere"),
    Case("model-missing", ["extract", *TINY, "--model", "{tmp}/no-such-model", "--store", "{new}"], "no-such-model"),
    Case("import-name-newline", ["import", "--store", "{store}", "--dataset", "digits", "--split", "test",
                                 "--name", "evil\n", "{tmp}/f.npy"], "import name 'evil\\n'",
         {"f.npy": np.zeros((8, 4), np.float32)}),
    Case("import-name-too-long", ["import", "--store", "{store}", "--dataset", "digits", "--split", "test",
                                  "--name", "n" * 300, "{tmp}/f.npy"], "300 characters",
         {"f.npy": np.zeros((8, 4), np.float32)}),
    Case("import-nan", ["import", "--store", "{store}", "--dataset", "digits", "--split", "test", "--name", "bad",
                        "{tmp}/f.npy"], "rows [3] hold NaN", {"f.npy": np.where(np.arange(32).reshape(8, 4) == 13,
                                                                                     np.nan, 1.0)}),
    Case("import-float16-overflow", ["import", "--store", "{store}", "--dataset", "digits", "--split", "test",
                                     "--name", "big", "{tmp}/f.npy"], "float16's range",
         {"f.npy": np.full((8, 4), 1e6, np.float32)}),
    Case("import-complex", ["import", "--store", "{store}", "--dataset", "digits", "--split", "test", "--name", "cx",
                            "{tmp}/f.npy"], "real numbers", {"f.npy": np.zeros((8, 4), np.complex64)}),
    Case("import-no-features", ["import", "--store", "{store}", "--dataset", "digits", "--split", "test", "--name",
                                "empty", "{tmp}/f.npy"], "holds no features", {"f.npy": np.zeros((8, 0), np.float32)}),
    Case("import-no-store", ["import", "--store", "{new}", "--dataset", "cub", "--split", "test", "--name", "x",
                             "{tmp}/f.npy"], "no feature store", {"f.npy": np.zeros((8, 4), np.float32)}),
    Case("import-starts-no-store-when-refused", ["import", "--store", "{new}", "--dataset", "digits", "--split",
                                                 "test", "--name", "x", "{tmp}/f.npy"], "has 8 rows",
         {"f.npy": np.zeros((8, 4), np.float32)}),
    # probe, cka, verify
    Case("probe-zero-byte-chunk", ["probe", "--store", "{damaged}", "--dataset", "digits", "--train-split", "test",
                                   "--test-split", "test", "--out", "{tmp}/r", "--device", "cpu"], "data/c/0/0/0/0"),
    Case("cka-zero-byte-chunk", ["cka", "--store", "{damaged}", "--dataset", "digits", "--a", "block=3,t=90,pool=1",
                                 "--b", "block=3,t=90,pool=1"], "data/c/0/0/0/0"),
    Case("probe-logistic-budget", ["probe", "--store", "{store}", "--dataset", "digits", "--train-split", "test",
                                   "--test-split", "test", "--head", "logistic", "--memory-budget", "1K", "--out",
                                   "{tmp}/r", "--device", "cpu"], "logistic needs"),
    Case("probe-store-empty", ["probe", "--store", "", "--dataset", "digits"], "--store is empty"),
    Case("cka-out-too-long", ["cka", "--store", "{store}", "--dataset", "digits", "--a", "block=3,t=90,pool=1",
                              "--out", "{tmp}/" + LONG], "--out"),
    Case("verify-no-store", ["verify", "--store", "{new}"], "no feature store"),
    Case("blocks-resolution", ["blocks", "--model", "random:tiny", "--resolution", "100000"], "--resolution"),
    # pipelines
    Case("yaml-parse-error", ["run", "{tmp}/p.yaml", "--dry-run"], "not valid YAML: line 3",
         {"p.yaml": "stages:\n  extract: {dataset: [digits\n"}),
    Case("yaml-alias-bomb", ["run", "{tmp}/p.yaml", "--dry-run"], "expands to more than",
         {"p.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
          + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
          + "stages: {extract: {dataset: digits, model: m, store: s.zarr, matrix: {block: 1, t: 1}, root: *i}}\n"}),
    Case("pipeline-name-escapes", ["run", "{tmp}/p.yaml", "--dry-run"], "pipeline name 'x/../../../ESCAPED'",
         {"p.yaml": "name: x/../../../ESCAPED\nstages: {extract: {dataset: digits, model: random:tiny, "
                    "store: '{new}', matrix: {block: 3, t: 90}}}\n"}),
    Case("stage-name-escapes", ["run", "{tmp}/p.yaml", "--dry-run"], "stage name '../../X'",
         {"p.yaml": "stages: {'../../X': {kind: extract, dataset: digits, model: random:tiny, store: '{new}', "
                    "matrix: {block: 3, t: 90}}}\n"}),
    Case("pipeline-set-t", ["run", "{tmp}/p.yaml", "--dry-run", "--set", "extract.matrix.t=[1000]"], "--t 1000",
         {"p.yaml": "stages: {extract: {dataset: digits, model: random:tiny, store: '{new}', "
                    "matrix: {block: 3, t: 90}}}\n"}),
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """An intact store, and a copy with a zero-byte data chunk."""
    base = tmp_path_factory.mktemp("bad-inputs")
    store = base / "store.zarr"
    extract(dataset="digits", model="random:tiny", blocks=[3], ts=[90], splits=["test"], limit=8, device="cpu",
            num_workers=0, store=str(store))
    damaged = Path(shutil.copytree(store, base / "damaged.zarr"))
    (chunk,) = damaged.glob("features/*/*/*/*/data/c/0/0/0/0")
    chunk.write_bytes(b"")
    return {"store": store, "damaged": damaged}


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _run(case: Case, root: Path, stores: dict[str, Path]) -> dict:
    tmp = root / case.name
    tmp.mkdir()
    values = {"tmp": str(tmp), "new": str(tmp / "new.zarr"), "store": str(stores["store"]),
              "damaged": str(stores["damaged"])}
    for name, content in case.files.items():
        if isinstance(content, np.ndarray):
            np.save(tmp / name, content)
        else:
            text = str(content)
            for key, value in values.items():
                text = text.replace("{" + key + "}", value)
            (tmp / name).write_text(text)
    args = [a.replace("{tmp}", values["tmp"]).replace("{new}", values["new"]).replace("{store}", values["store"])
            .replace("{damaged}", values["damaged"]) for a in case.args]
    before = _snapshot(stores["store"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "DIFFEAT_LOG_LEVEL": "30"}
    done = subprocess.run([sys.executable, "-m", "diffeat", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp, check=False)
    return {"returncode": done.returncode, "output": done.stdout + done.stderr, "new": Path(values["new"]),
            "store_changed": _snapshot(stores["store"]) != before}


@pytest.fixture(scope="module")
def outcomes(stores, tmp_path_factory) -> dict[str, dict]:
    """Every case run once, three at a time (each is a fresh interpreter: mostly start-up)."""
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(3) as pool:
        results = pool.map(lambda c: (c.name, _run(c, root, stores)), CASES)
        return dict(results)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_line_and_creates_nothing(case, outcomes):
    got = outcomes[case.name]
    output = got["output"]
    assert got["returncode"] in (1, 2), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "Error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert case.names in errors[0], errors[0]
    assert "the model" not in errors[0] or not case.name.startswith("import"), errors[0]
    assert not got["new"].exists(), f"{case.name} created {got['new']}"
    assert not got["store_changed"], f"{case.name} wrote into the existing store"


def test_a_full_disk_is_one_line_and_leaves_no_temp_file_or_claim(tmp_path):
    """Issue 16: ENOSPC ended in a traceback and left a `.tmp` claim. A 160 KiB tmpfs fills mid-run."""
    mount = tmp_path / "full"
    mount.mkdir()
    store = mount / "s.zarr"
    script = (f"mount -t tmpfs -o size=160k tmpfs {mount} && cd {tmp_path} && {sys.executable} -m diffeat -q extract "
              f"--dataset digits --model random:tiny --block 3 --t 90 --pool 4 --split train --limit 512 "
              f"--chunk-rows 16 --device cpu --num-workers 0 --store {store}; echo rc=$?; "
              f"find {mount} -name '*.tmp' | sed 's/^/TMP /'; find {mount}/s.zarr/_claims -type f | sed 's/^/CLAIM /'; "
              f"umount {mount}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for command in (["unshare", "-rm", "sh", "-c", script], ["sh", "-c", script]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
        if "rc=" in done.stdout:
            break
    else:
        pytest.skip("cannot mount a small tmpfs here (needs user namespaces or root)")
    output = done.stdout + done.stderr
    assert "rc=1" in output, output[-3000:]
    errors = [line for line in output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and "no space left writing feature store" in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert "TMP " not in output and "CLAIM " not in output, output[-3000:]


def test_a_corrected_import_replaces_one_an_earlier_diffeat_left_unfinished(stores, tmp_path):
    """Issue 16: an import refused for its NaN after creating its array left it `in_progress` with a claim, and the
    corrected import was then refused as "different contents". Now the values are checked before anything is
    written, and an unfinished import of that name (as an earlier diffeat left it) is replaced."""
    from diffeat.store import open_store
    from diffeat.store.imports import import_features
    from diffeat.store.writer import SettingWriter

    store = Path(shutil.copytree(stores["store"], tmp_path / "s.zarr"))
    fs = open_store(str(store), mode="a")
    meta = {"settings": {"import": "feat"}, "settings_hash": "0" * 64,
            "setting": {"model": "external", "dataset": "digits", "split": "test", "block": None, "t": None,
                        "pool": None, "name": "feat"}}
    SettingWriter.open(fs, "features/external/digits/test/feat", (8, 4), "float16", meta, "import feat")
    bad = np.ones((8, 4), np.float32)
    bad[2, 1] = np.inf
    before = _snapshot(store)
    with pytest.raises(DiffeatError, match=r"rows \[2\] hold NaN, inf") as e:
        import_features(fs, "digits", "test", "feat", bad)
    assert "the model" not in str(e.value) and _snapshot(store) == before
    result = import_features(fs, "digits", "test", "feat", np.ones((8, 4), np.float32))
    assert result.outcome == "written" and result.info.status == "complete"
    assert np.asarray(fs.open_features(dataset="digits", split="test", name="feat").load()).shape == (8, 4)


def test_the_float16_finiteness_test_agrees_with_numpy():
    """``all_finite`` reads float16 by its exponent bits in L2-sized steps; NumPy's isfinite is the reference."""
    from diffeat.store.writer import FINITE_STEP, all_finite

    rng = np.random.default_rng(0)
    x = rng.standard_normal(3 * FINITE_STEP + 5).astype(np.float16)
    assert all_finite(x) and all_finite(x[:0]) and all_finite(x[:1])
    for where in (0, FINITE_STEP - 1, FINITE_STEP, 3 * FINITE_STEP + 4):
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[where] = bad
            assert all_finite(y) == bool(np.isfinite(y).all()) is False, (where, bad)
    big = np.full(7, 65504, dtype=np.float16)  # the largest finite float16
    assert all_finite(big) and all_finite(big.astype(np.float32))
