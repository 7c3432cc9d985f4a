"""Limits that hold: CKA's memory stays within its budget, CKA of constant features is undefined (not a
number), and a logistic head too large for the budget is refused before it starts.

Issue 16: CKA with ``--memory-budget 512M`` on 200,000 x 4,096 fp16 features peaked at 1.0 GB (its
row blocks were rounded up to whole 8,192-row shards, and the moments pass's float64 temporaries
were not counted). The test measures the peak of every allocation CKA makes (``tracemalloc``
counts NumPy's buffers and zarr's decoded chunks) on a setting five times the budget.
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from diffeat.cka import cka_matrix
from diffeat.cka.api import open_specs
from diffeat.cka.settings import SettingSpec
from diffeat.data.table import SampleTable
from diffeat.errors import DiffeatError
from diffeat.store import open_store
from diffeat.store.imports import import_features
from diffeat.store.writer import write_sample_table

MiB = 1 << 20


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """20,000 rows: a random (N, 512) import, and a constant (N, 16) one."""
    location = str(tmp_path_factory.mktemp("limits") / "feats.zarr")
    fs = open_store(location, mode="a")
    n = 20_000
    table = SampleTable("digits", "train", None, tuple(f"s{i}" for i in range(n)), ("",) * n,
                        np.arange(n) % 10, tuple(map(str, range(10))))
    write_sample_table(fs, table)
    rng = np.random.default_rng(0)
    # Default chunking: 2 MiB chunks of 2,048 rows, larger than the row blocks a small budget allows.
    import_features(fs, "digits", "train", "random", rng.standard_normal((n, 512)).astype(np.float16), model="ext")
    import_features(fs, "digits", "train", "constant", np.full((n, 16), 0.1, np.float32), model="ext")
    return location


def _source(store: str, name: str):
    (source,) = open_specs(open_store(store), "digits", "train", [SettingSpec.parse(f"name={name}")])
    return source


def test_cka_stays_within_its_memory_budget_on_a_setting_larger_than_it(store):
    source = _source(store, "random")
    budget = 12 * MiB
    data = source.n * source.dim * 4  # as read (float32): 39 MiB
    assert data > 3 * budget
    chunk = int(np.prod(source.features.array.chunks)) * source.features.array.dtype.itemsize
    cka_matrix([source], [source], memory_budget=budget)  # warm-up: zarr's and numpy's one-off allocations
    tracemalloc.start()
    try:
        result = cka_matrix([source], [source], memory_budget=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.route == "features" and not result.plan["in_memory"]
    assert result.value == pytest.approx(1.0)
    # The stated constant: stored chunks in flight while zarr decodes (raw and decoded, a few at once).
    constant = 4 * chunk + 1 * MiB
    print(f"\nCKA peak {peak / MiB:.2f} MiB for a {budget / MiB:.0f} MiB budget on {data / MiB:.1f} MiB of features "
          f"(rows {result.plan['rows']}; allowed: budget + {constant / MiB:.1f} MiB)")
    assert peak <= budget + constant


def test_cka_of_constant_features_is_undefined_with_the_reason(store, tmp_path):
    """Issue 16: CKA of constant features returned a number; it is null with the reason, "n/a" in the heatmap."""
    from click.testing import CliRunner

    from diffeat.cli import main

    result = cka_matrix([_source(store, "constant"), _source(store, "random")])
    assert np.isnan(result.matrix).all() or np.isnan(result.matrix[0]).all()
    assert "constant" in result.undefined and "zero Gram matrix" in result.undefined["constant"]
    out = CliRunner().invoke(main, ["cka", "--store", store, "--dataset", "digits", "--split", "train",
                                    "--a", "name=constant", "--b", "name=random", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output[out.output.index("{"):])
    assert doc["cka"] is None and "constant" in doc["undefined"]
    files = CliRunner().invoke(main, ["cka", "--store", store, "--dataset", "digits", "--split", "train",
                                      "--name", "constant", "--name", "random", "--out", str(tmp_path)])
    assert files.exit_code == 0 and "n/a" in files.output
    record = json.loads((tmp_path / "cka.json").read_text())
    assert record["matrix"][0] == [None, None] and record["undefined"]["constant"]


def test_a_heatmap_says_na_for_undefined_cells(tmp_path):
    from matplotlib.figure import Figure

    from diffeat.output.plots import heatmap

    texts = []
    original = Figure.savefig

    def keep_texts(self, *args, **kwargs):
        texts.extend(t.get_text() for ax in self.axes for t in ax.texts)
        return original(self, *args, **kwargs)

    Figure.savefig = keep_texts
    try:
        heatmap(np.array([[1.0, np.nan], [np.nan, 0.5]]), ["a", "b"], ["a", "b"], tmp_path / "h.png")
    finally:
        Figure.savefig = original
    assert texts.count("n/a") == 2 and "1.00" in texts


def test_logistic_is_refused_when_its_solver_does_not_fit_the_budget(store, tmp_path):
    """Issue 16: logistic on 64 x 1,048,576 features was not refused: L-BFGS's float64 history was not counted."""
    from diffeat.probe import probe
    from diffeat.probe.reference import logistic_bytes

    # 20,000 x 512 float32, three times over (fit + val, all rows, a concatenation), and L-BFGS's history.
    need = logistic_bytes(20_000, 512, 10)
    assert need == 3 * 20_000 * 512 * 4 + 24 * 10 * 513 * 8
    with pytest.raises(DiffeatError, match=r"logistic needs about .*L-BFGS.*--memory-budget"):
        probe(store=store, dataset="digits", name="random", train_split="train", test_split="train",
              heads=["logistic"], memory_budget=str(need - 1), out=str(tmp_path), device="cpu")
    # A million features and a hundred classes: the solver alone is far beyond a 4 GiB budget.
    assert logistic_bytes(64, 1 << 20, 100) > 18 << 30
