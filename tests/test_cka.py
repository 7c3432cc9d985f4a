"""CKA: estimators against a plain float64 NumPy implementation, routes against each other,
streaming from real zarr arrays, and the ``cka`` / ``import`` commands on a real store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from diffeat.cka import ArraySource, cka, cka_matrix
from diffeat.cka.estimators import center_gram, feature_hsic, gram_linear
from diffeat.cka.settings import SettingSpec
from diffeat.errors import DiffeatError, StoreError

# ---------------------------------------------------------------------------------------------
# The oracle: textbook formulas with an explicit centering matrix H (O(n³), float64, small n).


def ref_hsic(k: np.ndarray, l: np.ndarray, estimator: str) -> float:
    n = len(k)
    if estimator == "biased":
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2
    # Song et al. (2007), eq. 5: the three-term U-statistic (not the U-centering used by diffeat).
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cka(x: np.ndarray, y: np.ndarray, estimator: str = "unbiased", kernel: str = "linear") -> float:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)

    def gram(z):
        if kernel == "linear":
            return z @ z.T
        sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)  # brute-force distances
        return np.exp(-sq / (2 * np.median(sq)))

    k, l = gram(x), gram(y)
    return ref_hsic(k, l, estimator) / np.sqrt(ref_hsic(k, k, estimator) * ref_hsic(l, l, estimator))


def related(n: int = 240, seed: int = 0, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X, Y sharing a rank-6 latent (Y nonlinear), and independent W; optional large feature means."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    x = z @ rng.normal(size=(6, 30)) + 0.5 * rng.normal(size=(n, 30))
    y = np.maximum(z @ rng.normal(size=(6, 4, 2, 2)).reshape(6, 16) + 0.7 * rng.normal(size=(n, 16)), 0)
    w = rng.normal(size=(n, 45))
    if offset:
        x = x + rng.uniform(offset, 2 * offset, size=30)
        y = y + rng.uniform(offset, 2 * offset, size=16)
    return x, y.reshape(n, 4, 2, 2), w


def zarr_source(tmp_path: Path, name: str, a: np.ndarray, chunk: int = 16, ids=None) -> ArraySource:
    z = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=a.shape, dtype="float64",
                          chunks=(chunk,) + a.shape[1:])
    z[:] = a
    return ArraySource(z, label=name, ids=ids)


# ---------------------------------------------------------------------------------------------
# Estimators


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_matches_numpy_reference(estimator, kernel):
    x, y, w = related(n=120)
    got = cka_matrix([x, y, w], kernel=kernel, estimator=estimator).matrix
    for i, a in enumerate((x, y, w)):
        for j, b in enumerate((x, y, w)):
            assert got[i, j] == pytest.approx(ref_cka(a, b, estimator, kernel), abs=1e-10)


def test_feature_space_unbiased_formula_equals_u_centered_grams():
    # The derivation in estimators.py, checked term by term on centered features.
    x, y, _ = related(n=50, offset=20.0)
    xc, yc = x - x.mean(0), y.reshape(50, -1) - y.reshape(50, -1).mean(0)
    s, r = (xc**2).sum(1), (yc**2).sum(1)
    feat = feature_hsic(float(((xc.T @ yc) ** 2).sum()), float(s @ r), s.sum(), r.sum(), 50, "unbiased")
    grams = float((center_gram(gram_linear(x), "unbiased") * center_gram(gram_linear(y), "unbiased")).sum())
    assert feat == pytest.approx(grams / (50 * 47), rel=1e-12)
    assert feat == pytest.approx(ref_hsic(xc @ xc.T, yc @ yc.T, "unbiased"), rel=1e-12)
    # ... and the unbiased HSIC does not depend on centering the features at all.
    assert ref_hsic(x @ x.T, y.reshape(50, -1) @ y.reshape(50, -1).T, "unbiased") == pytest.approx(feat, rel=1e-9)


@pytest.mark.parametrize("route", ["features", "gram", "minibatch"])
def test_self_similarity_and_invariances(route):
    x, y, _ = related(n=200)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 30)))
    opts = {"route": route, "batch_size": 64, "passes": 2}
    assert cka(x, x, **opts).value == pytest.approx(1.0, abs=1e-12)
    base = cka(x, y, **opts).value
    assert cka(x @ q, y, **opts).value == pytest.approx(base, abs=1e-10)  # orthogonal transform
    assert cka(7.5 * x + 3.0, y, **opts).value == pytest.approx(base, abs=1e-10)  # isotropic scaling, shift
    assert cka(x, y, **opts).value != pytest.approx(cka(x * np.linspace(0.1, 3, 30), y, **opts).value, abs=1e-3)


def test_independent_features_unbiased_near_zero_biased_inflated():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(400, 200)), rng.normal(size=(400, 200))
    assert abs(cka(x, y).value) < 0.02
    assert abs(cka(x, y, route="minibatch", batch_size=100, passes=3).value) < 0.03
    # Biased CKA of independent isotropic data ≈ D/(N+D) (probe_cka.md §3.3): 1/3 here.
    assert cka(x, y, estimator="biased").value == pytest.approx(200 / 600, abs=0.03)


# ---------------------------------------------------------------------------------------------
# Routes agree (in memory, streamed from zarr in small blocks, several passes)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_all_routes_agree_including_out_of_core(tmp_path, estimator):
    x, y, w = related(n=300, offset=40.0)  # feature means of 40-80 σ: centering must be done right
    ref = np.array([[ref_cka(a, b, estimator) for b in (x, y, w)] for a in (x, y, w)])
    srcs = [zarr_source(tmp_path, name, a) for name, a in (("x", x), ("y", y), ("w", w))]
    runs = {
        "features": cka_matrix([x, y, w], route="features", estimator=estimator),
        "gram": cka_matrix([x, y, w], route="gram", estimator=estimator),
        "float32": cka_matrix([x, y, w], route="gram", estimator=estimator, precision="float32"),
        # 218 KB of features under a 400 KB budget: streamed from zarr in 48-row blocks (16-row chunks).
        "features-zarr": cka_matrix(srcs, route="features", estimator=estimator, memory_budget="400KB", block_rows=48),
        "gram-zarr": cka_matrix(srcs, route="gram", estimator=estimator, memory_budget="400KB", block_rows=48),
        # accumulators over the budget: one pass per group of pairs
        "features-passes": cka_matrix(srcs, route="features", estimator=estimator, memory_budget="90KB", block_rows=24),
        "minibatch-one-batch": cka_matrix([x, y, w], route="minibatch", estimator=estimator, batch_size=300),
    }
    assert not runs["gram-zarr"].plan["in_memory"] and runs["features-passes"].plan["estimates"]["feature_passes"] > 1
    for name, run in runs.items():
        tol = 1e-6 if name == "float32" else 1e-9
        np.testing.assert_allclose(run.matrix, ref, atol=tol, err_msg=name)


def test_minibatch_out_of_core_is_the_same_estimate(tmp_path):
    x, y, w = related(n=250)
    srcs = [zarr_source(tmp_path, name, a) for name, a in (("x", x), ("y", y), ("w", w))]
    in_memory = cka_matrix([x, y, w], route="minibatch", batch_size=32, passes=2, seed=3)
    # A 100 KB budget: each pass gathers random partitions of 32..64 rows by streaming reads.
    streamed = cka_matrix(srcs, route="minibatch", batch_size=32, passes=2, seed=3, memory_budget="100KB", block_rows=48)
    assert not streamed.plan["in_memory"] and streamed.plan["partition_rows"] < 250
    np.testing.assert_allclose(streamed.matrix, in_memory.matrix, atol=1e-12)
    full = cka_matrix([x, y, w]).matrix  # minibatch estimates the same quantity
    assert np.abs(in_memory.matrix - full).max() < 0.1


def test_rectangular_matrix_and_rbf_tiles():
    x, y, w = related(n=150)
    full = cka_matrix({"x": x, "y": y, "w": w}).matrix
    rect = cka_matrix({"x": x, "y": y}, {"w": w, "x": x})
    assert rect.row_labels == ["x", "y"] and rect.col_labels == ["w", "x"]
    np.testing.assert_allclose(rect.matrix, full[np.ix_([0, 1], [2, 0])], atol=1e-12)
    rbf = cka_matrix([x, y, w], kernel="rbf").matrix
    # A budget for 4 n×n Grams: settings in tiles, Grams rebuilt; same numbers.
    tiled = cka_matrix([x, y, w], kernel="rbf", memory_budget=150 * 150 * 8 * 4).matrix
    np.testing.assert_allclose(tiled, rbf, atol=1e-12)


def test_sample_id_mismatch_is_an_error(tmp_path):
    x, y, _ = related(n=40)
    ids = [f"img{i}" for i in range(40)]
    good = cka(ArraySource(x, label="x", ids=ids), ArraySource(y, label="y", ids=ids))
    assert np.isfinite(good.value)
    with pytest.raises(StoreError, match="different order"):
        cka(ArraySource(x, label="x", ids=ids), ArraySource(y, label="y", ids=ids[::-1]))
    with pytest.raises(StoreError, match="sample id mismatch"):
        cka(ArraySource(x, label="x", ids=ids), ArraySource(y, label="y", ids=ids[:-1] + ["other"]))
    with pytest.raises(StoreError, match="rows"):
        cka(x, y[:30])


def test_option_errors():
    x, y, _ = related(n=40)
    for bad, match in (({"estimator": "debiased"}, "estimator"), ({"route": "fast"}, "route"),
                       ({"kernel": "cosine"}, "kernel"), ({"memory_budget": "lots"}, "memory"),
                       ({"kernel": "rbf", "route": "features"}, "RBF"), ({"passes": 0}, "passes")):
        with pytest.raises(DiffeatError, match=match):
            cka(x, y, **bad)
    with pytest.raises(DiffeatError, match="at least 4"):
        cka(x[:3], y[:3])
    with pytest.raises(DiffeatError, match="bad setting"):
        SettingSpec.parse("block=24,t=ninety")
    assert SettingSpec.parse("b=24,t=90,pool=1") == SettingSpec(24, 90, 1)
    assert SettingSpec.parse("resnet50") == SettingSpec(name="resnet50")


def test_degenerate_setting_is_nan_not_a_number_that_looks_right():
    _, y, _ = related(n=40)
    r = cka_matrix({"const": np.ones((40, 3)), "y": y})
    assert np.isnan(r.matrix[0]).all() and r.matrix[1, 1] == pytest.approx(1.0)
    assert r.matrix_json()["matrix"][0] == [None, None]


def test_auto_route_follows_the_cost_model():
    from diffeat.cka.plan import make_plan

    def route(n, dims, budget=8 << 30):
        mask = np.ones((len(dims), len(dims)), dtype=bool)
        return make_plan(n=n, dims=dims, itemsize=4, chunk_rows=16, mask=mask, kernel="linear", route="auto",
                         precision="float64", budget=budget, batch=512).route

    assert route(10_000, [1024, 1024]) == "features"  # one pair, D ≪ N
    assert route(2_000, [8192, 8192]) == "gram"  # D ≫ N
    assert route(10_000, [256] * 7 + [512] * 6 + [1024] * 12 + [512] * 6 + [256] * 6) == "gram"  # 37 blocks
    assert route(1_000_000, [65536, 65536], budget=1 << 30) == "minibatch"  # nothing exact fits


def test_heatmap_marks_and_nan(tmp_path):
    from diffeat.output.plots import _marked_cells, heatmap

    m = np.array([[0.2, np.nan, 0.9], [0.5, 0.95, 0.1]])
    assert _marked_cells(m, "max") == [(1, 1)] and _marked_cells(m, "min") == [(1, 2)]
    assert _marked_cells(m, (0, 2)) == [(0, 2)] and _marked_cells(m, [(0, 0), (1, 2)]) == [(0, 0), (1, 2)]
    path = heatmap(m, ["a", "b"], ["x", "y", "z"], tmp_path / "h.png", vmin=0, vmax=1, title="acc", mark="max",
                   cbar_label="top-1")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="labels"):
        heatmap(m, ["a"], ["x", "y", "z"], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# Commands on a real store (extract with a seeded random tiny U-Net on built-in digits)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from diffeat.extract import extract

    path = tmp_path_factory.mktemp("cka") / "feats.zarr"
    extract(dataset="digits", model="random:tiny", blocks=[3, 7], ts=[50], pools=[1, 2], store=str(path),
            splits=["test"], limit=64, device="cpu")
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_cli_pair_and_matrix(store, tmp_path):
    from diffeat.cli.cka import cka as cka_cmd
    from diffeat.store import open_store

    before = _snapshot(store)
    runner = CliRunner()
    common = ["--store", str(store), "--dataset", "digits", "--split", "test"]
    res = runner.invoke(cka_cmd, ["--store", f"file://{store}", *common[2:], "--a", "block=3,t=50,pool=1",
                                  "--b", "block=7,t=50,pool=2", "--json"])
    assert res.exit_code == 0, res.output
    pair = json.loads(res.output)
    assert set(pair) >= {"cka", "estimator", "n"} and pair["n"] == 64 and pair["estimator"] == "unbiased"
    fs = open_store(str(store))
    a = fs.open_features(dataset="digits", split="test", block=3, t=50, pool=1).load(np.float64)
    b = fs.open_features(dataset="digits", split="test", block=7, t=50, pool=2).load(np.float64)
    assert pair["cka"] == pytest.approx(ref_cka(a, b), abs=1e-9)

    out = tmp_path / "out"
    res = runner.invoke(cka_cmd, common + ["--blocks", "3,7", "--t", "50", "--pool", "1-2", "--estimator", "biased",
                                           "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["labels"] == ["b3/t50/p1", "b3/t50/p2", "b7/t50/p1", "b7/t50/p2"] and doc["estimator"] == "biased"
    m = np.array(doc["matrix"])
    assert m.shape == (4, 4) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    np.testing.assert_allclose(np.load(out / "cka.npy"), m)
    assert (out / "cka.png").stat().st_size > 10_000 and (out / "cka.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "cka.csv").read_text().splitlines()[0] == ",b3/t50/p1,b3/t50/p2,b7/t50/p1,b7/t50/p2"
    record = json.loads((out / "cka.json").read_text())
    assert record["config"]["dataset"] == "digits" and len(record["settings"]) == 4
    assert all(s["path"].startswith("features/") for s in record["settings"])
    assert _snapshot(store) == before  # nothing written to the store

    res = runner.invoke(cka_cmd, common + ["--a", "block=5,t=50,pool=1", "--b", "block=3,t=50,pool=1"])
    assert isinstance(res.exception, StoreError) and "block=5" in str(res.exception)


def test_import_and_compare(store, tmp_path):
    from diffeat.cli.cka import cka as cka_cmd
    from diffeat.cli.import_features import import_features
    from diffeat.store import open_store

    fs = open_store(str(store))
    ref = fs.open_features(dataset="digits", split="test", block=7, t=50, pool=2)
    feats = np.tanh(ref.load(np.float64).reshape(64, -1) @ np.random.default_rng(0).normal(size=(256, 24)))
    runner = CliRunner()
    common = ["--store", str(store), "--dataset", "digits", "--split", "test"]

    # Rows in a shuffled order, with their ids: realigned to the sample table.
    perm = np.random.default_rng(1).permutation(64)
    np.save(tmp_path / "ext.npy", feats[perm].reshape(64, 6, 2, 2).astype(np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(ref.ids[perm]) + "\n")
    res = runner.invoke(import_features, [str(tmp_path / "ext.npy"), *common, "--name", "proj", "--ids",
                                          str(tmp_path / "ids.txt"), "--store-dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["reordered"] is True and json.loads(res.output)["outcome"] == "written"
    got = open_store(str(store)).open_features(dataset="digits", split="test", name="proj")
    np.testing.assert_allclose(got.load().reshape(64, -1), feats, rtol=1e-6)
    res = runner.invoke(import_features, [str(tmp_path / "ext.npy"), *common, "--name", "proj", "--ids",
                                          str(tmp_path / "ids.txt"), "--store-dtype", "float32", "--json"])
    assert json.loads(res.output)["outcome"] == "cached"

    res = runner.invoke(cka_cmd, common + ["--a", "block=7,t=50,pool=2", "--b", "proj", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["cka"] == pytest.approx(ref_cka(ref.load(np.float64), feats), abs=1e-6)

    # Errors: wrong N, ids that are not the table's, a name escaping the store, a taken name.
    np.save(tmp_path / "short.npy", feats[:60])
    (tmp_path / "bad_ids.txt").write_text("\n".join(["nope", *ref.ids[perm][1:]]) + "\n")
    for args, match in ((["short.npy", "--name", "short"], "60 rows"),
                        (["ext.npy", "--name", "bad", "--ids", str(tmp_path / "bad_ids.txt")], "do not match"),
                        (["ext.npy", "--name", "../escape"], "not allowed"),
                        (["short.npy", "--name", "proj", "--ids", str(tmp_path / "ids.txt")], "ids")):
        res = runner.invoke(import_features, [str(tmp_path / args[0]), *common, *args[1:]])
        assert isinstance(res.exception, StoreError), (args, res.output, res.exception)
        assert match in str(res.exception), (args, str(res.exception))
    # A zarr array as the source, (N, D), already in table order.
    z = zarr.create_array(str(tmp_path / "ext.zarr"), shape=(64, 24), chunks=(10, 24), dtype="float32")
    z[:] = feats
    res = runner.invoke(import_features, [str(tmp_path / "ext.zarr"), *common, "--name", "proj-zarr", "--model",
                                          "tanh", "--store-dtype", "float32"])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(open_store(str(store)).open_features(dataset="digits", split="test",
                                                                    name="proj-zarr").load(), feats, rtol=1e-6)

    np.save(tmp_path / "other.npy", feats[perm] * 2)
    res = runner.invoke(import_features, [str(tmp_path / "other.npy"), *common, "--name", "proj", "--ids",
                                          str(tmp_path / "ids.txt")])
    assert isinstance(res.exception, StoreError) and "--overwrite" in str(res.exception)
    assert not os.path.exists(store / "features" / "escape")
