"""``cka_matrix`` / ``cka``: CKA between feature sets, exact and out-of-core.

Inputs are arrays (N, D) or (N, C, k, k), zarr arrays, store ``FeatureSet`` objects or
:class:`~diffeat.cka.sources.ArraySource` objects. Each distinct setting's statistics
are computed once however many pairs it takes part in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffeat.cka.estimators import ESTIMATORS, KERNELS, check_estimator, cka_from_hsic
from diffeat.cka.plan import PRECISIONS, ROUTES, make_plan, memory_budget
from diffeat.cka.routes import features_route, gram_route, minibatch_route, rbf_route
from diffeat.cka.sources import ArraySource, LoadedSource, as_source, check_aligned, gather_rows, load, moments
from diffeat.errors import DiffeatError

logger = logging.getLogger(__name__)


@dataclass
class CKAResult:
    """A CKA matrix (rows × columns) and how it was computed."""

    row_labels: list[str]
    col_labels: list[str]
    matrix: np.ndarray  # float64 (rows, cols); NaN where a setting's self-HSIC is not positive
    kernel: str
    estimator: str
    route: str
    n: int
    seconds: float
    plan: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    settings: list[dict] = field(default_factory=list)  # one per distinct setting (rows first)
    config: dict = field(default_factory=dict)  # filled by callers that resolve settings (store, dataset ...)

    @property
    def value(self) -> float:
        """The single CKA value of a 1×1 result (a pair)."""
        if self.matrix.shape != (1, 1):
            raise ValueError(f"value is for a pair; this result is {self.matrix.shape[0]}×{self.matrix.shape[1]}")
        return float(self.matrix[0, 0])

    @property
    def square(self) -> bool:
        """True when rows and columns are the same settings."""
        return self.row_labels == self.col_labels

    def pair_json(self) -> dict:
        """``{"cka": value, "estimator": ..., "n": ...}`` (plus kernel, route and the two labels)."""
        return {"cka": _finite(self.value), "estimator": self.estimator, "n": self.n, "kernel": self.kernel,
                "route": self.route, "a": self.row_labels[0], "b": self.col_labels[0]}

    def matrix_json(self) -> dict:
        """``{"labels": [...], "matrix": [[...]], "estimator": ...}`` (``col_labels`` too when not square)."""
        out: dict[str, Any] = {"labels": self.row_labels}
        if not self.square:
            out["col_labels"] = self.col_labels
        out.update(matrix=[[_finite(v) for v in row] for row in self.matrix], estimator=self.estimator,
                   kernel=self.kernel, route=self.route, n=self.n)
        return out

    def record(self) -> dict:
        """Everything about this result, JSON-friendly (the ``cka.json`` written next to the matrix)."""
        from diffeat import __version__

        return {**self.matrix_json(), "col_labels": self.col_labels, "seconds": round(self.seconds, 3),
                "plan": self.plan, "options": self.options, "settings": self.settings, "config": self.config,
                "diffeat": __version__}


def _finite(v: float) -> float | None:
    """JSON has no NaN: a missing value is null."""
    return float(v) if np.isfinite(v) else None


def _as_sources(items: Any, prefix: str) -> list[ArraySource]:
    """Sources from one array/FeatureSet, a sequence of them, or a ``{label: features}`` mapping."""
    if isinstance(items, Mapping):
        out = []
        for label, value in items.items():
            source = as_source(value, str(label))
            if not isinstance(value, ArraySource):
                source.label = str(label)
            out.append(source)
        return out
    if hasattr(items, "shape") or hasattr(items, "iter_blocks"):
        items = [items]
    return [as_source(x, f"{prefix}{i}") for i, x in enumerate(items)]


def _key(source: ArraySource) -> object:
    """Identity of a setting: its store path, else the array object it wraps."""
    return source.meta.get("path") or id(source.array)


def _union(rows: list[ArraySource], cols: list[ArraySource]) -> tuple[list[ArraySource], list[int], list[int]]:
    """Distinct settings of rows and columns, and where each row/column sits among them."""
    union: list[ArraySource] = []
    where: dict[object, int] = {}
    for s in rows + cols:
        if _key(s) not in where:
            where[_key(s)] = len(union)
            union.append(s)
    seen: dict[str, int] = {}
    for s in union:
        seen[s.label] = seen.get(s.label, 0) + 1
    for k, s in enumerate(union):  # two models' b24/t90/p1 must not share a label
        if seen[s.label] > 1:
            s.label = f"{s.meta['model']}:{s.label}" if s.meta.get("model") else f"{s.label}#{k}"
    return union, [where[_key(s)] for s in rows], [where[_key(s)] for s in cols]


def _subsample(sources: list[ArraySource], size: int, seed: int, rows: int) -> list[ArraySource]:
    """The same random ``size`` rows (sorted, seeded) of every source, in memory."""
    n = sources[0].n
    index = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    data = gather_rows(sources, index, rows)
    out = []
    for s, d in zip(sources, data):
        ids = None if s.ids is None else s.ids[index]
        out.append(LoadedSource(ArraySource(d, label=s.label, ids=ids, meta=s.meta), d))
    return out


def cka_matrix(a: Any, b: Any = None, *, kernel: str = "linear", estimator: str = "unbiased", route: str = "auto",
               rbf_threshold: float = 1.0, batch_size: int = 512, passes: int = 1, seed: int = 0,
               precision: str = "float64", memory: str | int | None = None,
               subsample: int | None = None, block_rows: int | None = None, client: Any = None) -> CKAResult:
    """CKA between every setting of ``a`` and every setting of ``b`` (default: ``a`` against itself).

    ``a``/``b``: a sequence (or a ``{label: array}`` mapping) of features with the same samples
    in the same order; a mismatch of sample ids is a ``StoreError``.

    ``kernel``: ``linear`` or ``rbf`` (median-distance bandwidth times ``rbf_threshold``);
    ``estimator``: ``unbiased`` (default; ≈0 for independent features) or ``biased`` (Kornblith
    2019; inflated when D is comparable to N); ``route``: ``auto`` (the faster exact route that
    fits ``memory``), ``features``, ``gram`` or ``minibatch`` (Nguyen et al. 2021: a different,
    batch-based estimator: ``batch_size`` rows per batch, ``passes`` shuffled passes, ``seed``);
    ``precision``: dtype of the block products (``float64`` default; ``float32`` is about 2×
    faster, accumulators stay float64); ``memory``: budget such as ``"4GB"`` (default 60% of
    available memory, honouring ``ulimit -v``); ``subsample``: compare a seeded random subset of
    this many samples (e.g. for RBF at large N); ``block_rows``: force the row block / Gram
    tile size (default: from the budget, whole stored chunks); ``client``: a
    ``distributed.Client`` whose workers compute the exact linear routes' row-block sums,
    reading the settings from their zarr store themselves (:mod:`diffeat.cka.cluster`; the
    other routes, and features held in memory, run in this process, with a log line).
    """
    start = time.perf_counter()
    if kernel not in KERNELS:
        raise DiffeatError(f"unknown CKA kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise DiffeatError(f"unknown CKA estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    if route not in ROUTES:
        raise DiffeatError(f"unknown CKA route {route!r}: choose one of {', '.join(ROUTES)}")
    if precision not in PRECISIONS:
        raise DiffeatError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if passes < 1:
        raise DiffeatError(f"--passes must be at least 1, got {passes}")
    if kernel == "rbf" and route not in ("auto", "gram"):
        raise DiffeatError(f"RBF CKA needs n×n Gram matrices: --route {route} is for the linear kernel only")
    row_src = _as_sources(a, "a")
    col_src = row_src if b is None else _as_sources(b, "b")
    if not row_src or not col_src:
        raise DiffeatError("CKA needs at least one feature setting on each side")
    union, row_idx, col_idx = _union(row_src, col_src)
    n = check_aligned(union)
    if subsample is not None:
        if subsample < 4:
            raise DiffeatError(f"--subsample must be at least 4, got {subsample}")
        if subsample >= n:
            logger.info("subsample %d >= n=%d: using every sample", subsample, n)
            subsample = None
    n_used = subsample or n
    check_estimator(estimator, n_used)
    budget = memory_budget(memory)
    if subsample is not None:
        union = _subsample(union, subsample, seed, rows=4096)

    count = len(union)
    mask = np.zeros((count, count), dtype=bool)
    mask[np.ix_(row_idx, col_idx)] = True
    mask |= mask.T
    np.fill_diagonal(mask, True)
    chunk_rows = max((s.chunk_rows for s in union if not isinstance(s, LoadedSource)), default=1)

    def planned(streamed: bool):
        return make_plan(n=n_used, dims=[s.dim for s in union], itemsize=max(s.dtype.itemsize for s in union),
                         chunk_rows=chunk_rows, mask=mask, kernel=kernel, route=route, precision=precision,
                         budget=budget, batch=batch_size, block_rows=block_rows, streamed=streamed)

    refs = None
    if client is not None:
        from diffeat.cka.cluster import cluster_refs

        refs = cluster_refs(client, union, kernel, route)
    plan = planned(streamed=refs is not None)
    if refs is not None and plan.route not in ("features", "gram"):
        refs = cluster_refs(client, union, kernel, plan.route)  # logs that it runs here
        plan = planned(streamed=False)
    if plan.in_memory:
        union = [load(s, plan.rows) for s in union]
    dtype = np.dtype(precision)
    if refs is not None:
        from diffeat.cka import cluster

        stats = cluster.cluster_moments(client, refs, union, plan.rows)
        if plan.route == "features":
            h = cluster.cluster_features_route(client, refs, union, stats, mask, estimator, dtype, plan.acc_budget,
                                               plan.rows)
        else:
            h = cluster.cluster_gram_route(client, refs, stats, estimator, dtype, plan.tile)
    elif plan.route == "rbf":
        h = rbf_route(union, mask, estimator, rbf_threshold, budget)
    elif plan.route == "minibatch":
        h = minibatch_route(union, estimator, batch_size, passes, seed, plan.partition_rows, plan.rows)
    else:
        stats = [moments(s, plan.rows) for s in union]
        if plan.route == "features":
            h = features_route(union, stats, mask, estimator, dtype, plan.acc_budget, plan.rows)
        else:
            h = gram_route(union, stats, estimator, dtype, plan.tile, plan.cache_bytes)
    c = cka_from_hsic(h)
    seconds = time.perf_counter() - start
    logger.info("CKA %d×%d (%s, %s, route %s, n=%d) in %.1f s", len(row_idx), len(col_idx), kernel, estimator,
                plan.route, n_used, seconds)
    options = {"kernel": kernel, "estimator": estimator, "route": route, "precision": precision,
               "rbf_threshold": rbf_threshold, "batch_size": batch_size, "passes": passes, "seed": seed,
               "memory": memory, "subsample": subsample, "block_rows": block_rows}
    settings = [{**s.meta, "label": s.label, "dim": s.dim} for s in union]
    plan_record = plan.as_dict()
    if client is not None:
        from diffeat.cluster import describe

        plan_record["cluster"] = {**describe(client), "used": refs is not None}
    return CKAResult([union[i].label for i in row_idx], [union[i].label for i in col_idx],
                     c[np.ix_(row_idx, col_idx)], kernel, estimator, plan.route, n_used, seconds, plan_record,
                     options, settings)


def cka(x: Any, y: Any, **options: Any) -> CKAResult:
    """CKA between two feature sets (same options as :func:`cka_matrix`); ``.value`` is the number."""
    return cka_matrix([x], [y], **options)
