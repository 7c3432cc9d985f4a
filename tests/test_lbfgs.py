"""The full-batch L-BFGS linear probe (``diffeat.probe.lbfgs``) against scikit-learn.

scikit-learn's ``LogisticRegression`` is the reference we did not write: at a fixed C the
solver must reach its optimum (same objective, to the tolerance); tuned on the same
validation split (``diffeat.probe.reference.logistic``: the same C grid, selection and refit)
its test top-1 must be at least scikit-learn's, on digits-ddpm features of two blocks, a
Gaussian mixture with raw-activation-like scales and a 40-class mixture; and a split streamed
from the store must give the in-memory result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffeat.heads import Standardize
from diffeat.probe import lbfgs, reference
from diffeat.probe.data import (
    InMemoryRows,
    make_source,
    moments,
    standardizer,
    stratified_split,
)
from diffeat.probe.train import predict

CPU = torch.device("cpu")
CS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices: one thread is as fast, and the float results do not depend on the thread count."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def _mixture(classes: int, dim: int, per_class: int, seed: int, sep: float = 0.6):
    """Gaussian classes in a low-rank subspace, then per-feature scales and offsets (as raw activations)."""
    rng = np.random.default_rng(seed)
    rank = min(16, dim)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    means = rng.standard_normal((classes, rank)) @ basis.T * sep
    scale, offset = np.exp(rng.standard_normal(dim)), rng.normal(0, 3, dim)

    def draw(n_per):
        y = np.repeat(np.arange(classes), n_per)
        return ((means[y] + rng.standard_normal((len(y), dim))) * scale + offset).astype(np.float32), y

    return draw(per_class), draw(max(2, per_class // 2))


class Case:
    """One feature set: train/test row sources, the validation split and the standardisers."""

    def __init__(self, train, test, seed: int = 0):
        self.train, self.test = train, test
        self.fit, self.val = stratified_split(train.labels, 0.1, seed)
        m_fit, m_val = moments(train, self.fit, self.val)
        self.std_fit = Standardize(*standardizer(m_fit, "feature"))
        self.std_all = Standardize(*standardizer(m_fit.combined(m_val), "feature"))
        self.k = int(max(train.labels.max(), test.labels.max())) + 1

    def top1(self, out: dict) -> float:
        y, (top,), _ = predict(self.test, np.arange(len(self.test)), [out["probe"]], torch.nn.Identity(),
                               batch_size=4096, device=CPU)
        return float((top[:, 0] == y).mean())

    def ours(self, budget: int = 1 << 30, **kw) -> dict:
        return lbfgs.fit(self.train, self.fit, self.val, self.std_fit, self.std_all, cs=CS, num_classes=self.k,
                         device=CPU, budget=budget, **kw)

    def sklearn(self) -> dict:
        return reference.logistic(self.train, self.fit, self.val, self.std_fit, self.std_all, cs=CS,
                                  num_classes=self.k)


def _mixture_case(classes: int, dim: int, per_class: int, seed: int) -> Case:
    (x, y), (xt, yt) = _mixture(classes, dim, per_class, seed)
    return Case(InMemoryRows(x, y, CPU), InMemoryRows(xt, yt, CPU))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """digits through the built-in digits-ddpm model, blocks 2 and 8 at t=50, pool 1 (a real extract)."""
    from diffeat.extract import extract

    path = tmp_path_factory.mktemp("digits") / "feats.zarr"
    extract(dataset="digits", model="digits-ddpm", blocks=[2, 8], ts=[50], pools=[1], store=str(path),
            device="cpu", progress=False)
    return str(path)


def _digits_case(store: str, block: int, seed: int = 0) -> Case:
    from diffeat.store import open_store

    fs = open_store(store)
    train, test = (fs.open_features(dataset="digits", split=s, block=block, t=50, pool=1) for s in ("train", "test"))
    return Case(make_source(train, 1 << 30, CPU), make_source(test, 1 << 30, CPU), seed)


# ------------------------------------------------------------------------------------------------


def test_fixed_c_reaches_the_sklearn_optimum():
    from sklearn.linear_model import LogisticRegression

    case = _mixture_case(6, 24, 40, seed=1)
    x = lbfgs._dense(case.train, [case.fit], case.std_fit, CPU)
    y = case.train.labels[case.fit]
    for c in (1e-3, 1e-1, 10.0):
        lam = 1.0 / (c * len(y))
        theta = lbfgs.Params.zeros(x.shape[1], 6, CPU)
        info = lbfgs.minimize(lbfgs.DenseDesign(x, torch.from_numpy(y)), theta, lam, tol=1e-6)
        assert info.converged
        ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x.double().numpy(), y)

        def objective(w: np.ndarray, b: np.ndarray, lam: float = lam) -> float:  # plain float64 formula
            z = x.double().numpy() @ w + b
            lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
            return float((lse - z[np.arange(len(y)), y]).mean() + lam / 2 * (w**2).sum())

        ours = objective(theta.w.double().numpy(), theta.b.double().numpy())
        theirs = objective(ref.coef_.T, ref.intercept_)
        assert ours <= theirs + 1e-7, (c, ours, theirs)
        p_ours = torch.softmax(torch.addmm(theta.b, x, theta.w), 1).numpy()
        assert np.abs(p_ours - ref.predict_proba(x.double().numpy())).max() < 1e-3


def test_tuned_top1_at_least_sklearn_on_three_feature_sets(digits):
    # With the default seed's validation split. Both reach the same optimum at each C (test above),
    # so a different choice of C comes from validation scores one row apart: over seeds 0–2 of these
    # four sets ours was higher once, lower once (the 200-row mixture, seed 2) and equal 10 times.
    cases = {"digits-ddpm b2": _digits_case(digits, 2), "digits-ddpm b8": _digits_case(digits, 8),
             "mixture, raw scales": _mixture_case(8, 48, 50, seed=0),
             "40 classes": _mixture_case(40, 64, 20, seed=2)}
    for name, case in cases.items():
        ours, theirs = case.ours(), case.sklearn()
        assert case.top1(ours) >= case.top1(theirs), (name, ours["chosen"]["hparams"], theirs["chosen"]["hparams"])
        assert case.top1(ours) > 2.0 / case.k and ours["converged"]  # learnt something, and converged


def test_a_streamed_split_gives_the_in_memory_result(digits):
    from diffeat.store import open_store

    fs = open_store(digits)
    train = fs.open_features(dataset="digits", split="train", block=8, t=50, pool=1)
    in_memory = _digits_case(digits, 8, seed=1)
    streamed = Case(make_source(train, 1, CPU, block_rows=256), in_memory.test, seed=1)
    assert not streamed.train.in_memory
    a, b = in_memory.ours(), streamed.ours(budget=1)
    assert a["in_memory"] and not b["in_memory"] and b["passes"] > 0
    assert a["chosen"]["hparams"] == b["chosen"]["hparams"]
    assert [e["hparams"] for e in a["grid"]] == [e["hparams"] for e in b["grid"]]
    assert abs(in_memory.top1(a) - streamed.top1(b)) <= 1.0 / len(in_memory.test)
    wa, wb = a["probe"].head.fc.weight.detach(), b["probe"].head.fc.weight.detach()
    assert float((wa - wb).abs().max()) <= 1e-2 * float(wa.abs().max())  # both within the refit tolerance


def test_the_path_stops_after_two_worse_points_and_refines_around_the_best():
    case = _mixture_case(5, 16, 30, seed=4)
    out = case.ours(patience=2)
    cs = [e["hparams"]["C"] for e in out["grid"]]
    decades = [c for c in cs if c in CS]
    assert decades == sorted(decades) and decades == list(CS[:len(decades)])
    best = out["chosen"]["hparams"]["C"]
    y_val = case.train.labels[case.val]

    def score(e):
        return float((e["val_topk"][:, 0] == y_val).mean()), -e["val_loss"]

    assert score(out["chosen"]) == max(score(e) for e in out["grid"])
    if len(decades) < len(CS):  # stopped early: the last two decades were worse than the best before them
        assert all(score(e) < max(score(f) for f in out["grid"][:len(decades) - 2])
                   for e in out["grid"][len(decades) - 2:len(decades)])
    neighbours = [c for c in cs if c not in CS]
    assert neighbours and all(np.isclose(abs(np.log10(c) - np.log10(n)), 0.5)
                              for n in neighbours for c in [min(decades, key=lambda v: abs(np.log(v / n)))])
    assert best in cs and out["n_train"] == len(case.train)


def test_compact_history_is_the_two_loop_recursion():
    torch.manual_seed(0)
    p = 40
    a = torch.randn(p, p, dtype=torch.float64)
    hessian = a @ a.T + torch.eye(p, dtype=torch.float64)
    history = lbfgs.History(4)
    pairs = []
    for _ in range(7):
        s = torch.randn(p, dtype=torch.float64)
        history.push(s, hessian @ s)
        pairs = (pairs + [(s, hessian @ s)])[-4:]

    def two_loop(g, pairs):  # Nocedal & Wright, Algorithm 7.4
        q, alphas = g.clone(), []
        for s, y in reversed(pairs):
            alphas.append((s @ q) / (y @ s))
            q -= alphas[-1] * y
        s, y = pairs[-1]
        q *= (s @ y) / (y @ y)
        for (s, y), al in zip(pairs, reversed(alphas)):
            q += (al - (y @ q) / (y @ s)) * s
        return -q

    g = torch.randn(p, dtype=torch.float64)
    assert torch.allclose(history.direction(g), two_loop(g, pairs), atol=1e-12)
    history.retarget(0.3, 25)  # a new penalty on the first 25 coordinates: y gains 0.3 s there
    shift = torch.cat([torch.ones(25), torch.zeros(p - 25)]).double()
    assert torch.allclose(history.direction(g), two_loop(g, [(s, y + 0.3 * shift * s) for s, y in pairs]),
                          atol=1e-12)


def test_absent_classes_are_never_predicted():
    (x, y), (xt, yt) = _mixture(4, 8, 30, seed=5)
    keep = y != 2  # class 2 has no training rows
    case = Case(InMemoryRows(x[keep], y[keep], CPU), InMemoryRows(xt, yt, CPU))
    out = case.ours()
    assert out["probe"].head.fc.out_features == 4
    with torch.no_grad():
        assert not (out["probe"](torch.from_numpy(xt)).argmax(1) == 2).any()


def test_the_default_linear_probe_is_lbfgs_end_to_end(digits, tmp_path):
    import csv

    from diffeat.heads.io import load_probe
    from diffeat.probe import probe
    from diffeat.store import open_store

    common = dict(store=digits, dataset="digits", blocks=[8], ts=[50], pools=[1], device="cpu")
    report = probe(heads=["linear", "logistic"], out=tmp_path / "a", **common)
    linear, logistic = report.results
    assert linear.hparams["recipe"] == "lbfgs" and linear.hparams["C"] in [g["hparams"]["C"] for g in linear.grid]
    assert linear.test["top1"] >= logistic.test["top1"]
    with open(report.run_dir / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["head"] == "linear"]
    val = [r for r in rows if r["split"] == "val" and r["metric"] == "top1"]
    assert len(val) == len(linear.grid) and sum(r["selected"] == "True" for r in val) == 1
    assert sum(r["split"] == "fit" and r["metric"] == "objective" for r in rows) == len(linear.grid)
    # The saved probe applies to raw stored features and reproduces the reported test accuracy.
    model, _ = load_probe(linear.weights)
    test = open_store(digits).open_features(dataset="digits", split="test", block=8, t=50, pool=1)
    with torch.no_grad():
        pred = model(torch.from_numpy(test.load())).argmax(1).numpy()
    assert float((pred == test.labels).mean()) == pytest.approx(linear.test["top1"], abs=1e-9)
    # Streamed from the store (a 1-byte budget): the same accuracy, to one image (weakly regularised
    # fits stop at the tolerance in other places, which can move one validation image and the choice).
    streamed = probe(heads=["linear"], out=tmp_path / "b", memory_budget=1, save_weights=False, **common).results[0]
    assert streamed.hparams["recipe"] == "lbfgs"
    # Each streamed fit reads the split at least once per L-BFGS iteration; run.json records the count.
    assert linear.passes == 0 and streamed.passes >= sum(g["n_iter"] for g in streamed.grid)
    recorded = json.loads((tmp_path / "b").glob("*/run.json").__next__().read_text())["results"][0]
    assert recorded["passes"] == streamed.passes
    assert abs(streamed.test["top1"] - linear.test["top1"]) <= 1.0 / len(test) + 1e-12
    again = probe(heads=["linear"], out=tmp_path / "c", save_weights=False, **common).results[0]
    assert again.test == linear.test and again.hparams == linear.hparams  # deterministic
