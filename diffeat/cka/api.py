"""CKA's entry points: between settings of a store (``run_cka``/``store_cka``), or between arrays (``cka_matrix``/``cka``).

``run_cka(config)`` is the stage (``diffeat cka``, a pipeline's ``cka`` stage): it opens the
store read-only, resolves the settings of a :class:`~diffeat.cka.config.CkaConfig`, computes
the matrix and writes its files. ``cka_matrix`` takes arrays (N, D) or (N, C, k, k), zarr
arrays, store ``FeatureSet`` objects or :class:`~diffeat.cka.sources.ArraySource` objects.
Each distinct setting's statistics are computed once however many pairs it takes part in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from diffeat.cka.config import CkaConfig
from diffeat.cka.estimators import ESTIMATORS, KERNELS, check_estimator, cka_from_hsic
from diffeat.cka.plan import PRECISIONS, ROUTES, make_plan
from diffeat.cka.results import CKAResult
from diffeat.cka.routes import features_route, gram_route, minibatch_route, rbf_route
from diffeat.cka.settings import SettingSpec
from diffeat.cka.sources import (
    ArraySource,
    FeatureSetSource,
    LoadedSource,
    as_source,
    check_aligned,
    gather_rows,
    leave_out_skipped,
    load,
    moments,
)
from diffeat.errors import DiffeatError
from diffeat.runtime.checks import check_choice
from diffeat.runtime.memory import memory_budget as resolve_budget

if TYPE_CHECKING:
    from distributed import Client

    from diffeat.store.reader import FeatureStore

logger = logging.getLogger(__name__)


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
    # Settings of several models in one matrix (ADM blocks against a ResNet's stages): every extracted
    # setting says its model, so b3/p1 of a ResNet and b3/t90/p1 of ADM read as what they are.
    several = len({s.meta.get("model") for s in union if s.meta.get("block") is not None}) > 1
    for k, s in enumerate(union):  # two models' b24/t90/p1 must not share a label
        if s.meta.get("model") and (seen[s.label] > 1 or (several and s.meta.get("block") is not None)):
            s.label = f"{s.meta['model']}:{s.label}"
        elif seen[s.label] > 1:
            s.label = f"{s.label}#{k}"
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
               precision: str = "float64", memory_budget: str | int | None = None,
               subsample: int | None = None, block_rows: int | None = None, client: Client | None = None
               ) -> CKAResult:
    """CKA between every setting of ``a`` and every setting of ``b`` (default: ``a`` against itself).

    ``a``/``b``: a sequence (or a ``{label: array}`` mapping) of features with the same samples
    in the same order; a mismatch of sample ids is a ``StoreError``.

    ``kernel``: ``linear`` or ``rbf`` (median-distance bandwidth times ``rbf_threshold``);
    ``estimator``: ``unbiased`` (default; ≈0 for independent features) or ``biased`` (Kornblith
    2019; inflated when D is comparable to N); ``route``: ``auto`` (the faster exact route that
    fits ``memory``), ``features``, ``gram`` or ``minibatch`` (Nguyen et al. 2021: a different,
    batch-based estimator: ``batch_size`` rows per batch, ``passes`` shuffled passes, ``seed``);
    ``precision``: dtype of the block products (``float64`` default; ``float32`` is about 2×
    faster, accumulators stay float64); ``memory_budget``: such as ``"4GB"`` (default 60% of
    available memory, honouring ``ulimit -v``); ``subsample``: compare a seeded random subset of
    this many samples (e.g. for RBF at large N); ``block_rows``: force the row block / Gram
    tile size (default: from the budget, whole stored chunks); ``client``: a
    ``distributed.Client`` whose workers compute the exact linear routes' row-block sums,
    reading the settings from their zarr store themselves (:mod:`diffeat.cka.cluster`; the
    other routes, and features held in memory, run in this process, with a log line).
    """
    start = time.perf_counter()
    check_choice(kernel, KERNELS, "--kernel")
    check_choice(estimator, ESTIMATORS, "--estimator")
    check_choice(route, ROUTES, "--route")
    check_choice(precision, PRECISIONS, "--precision")
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
    budget = resolve_budget(memory_budget)
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
    stats = None
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
    undefined = undefined_settings(h, stats)
    for i in undefined:
        c[i, :] = c[:, i] = np.nan
        logger.warning("CKA with %s is undefined: %s", union[i].label, undefined[i])
    seconds = time.perf_counter() - start
    logger.info("CKA %d×%d (%s, %s, route %s, n=%d) in %.1f s", len(row_idx), len(col_idx), kernel, estimator,
                plan.route, n_used, seconds)
    options = {"kernel": kernel, "estimator": estimator, "route": route, "precision": precision,
               "rbf_threshold": rbf_threshold, "batch_size": batch_size, "passes": passes, "seed": seed,
               "memory_budget": memory_budget, "subsample": subsample, "block_rows": block_rows}
    settings = [{**s.meta, "label": s.label, "dim": s.dim} for s in union]
    plan_record = plan.as_dict()
    if client is not None:
        from diffeat.runtime.cluster import describe

        plan_record["cluster"] = {**describe(client), "used": refs is not None}
    return CKAResult([union[i].label for i in row_idx], [union[i].label for i in col_idx],
                     c[np.ix_(row_idx, col_idx)], kernel, estimator, plan.route, n_used, seconds, plan_record,
                     options, settings, undefined={union[i].label: why for i, why in undefined.items()})


#: A setting whose centred sum of squares is below this fraction of its raw sum of squares is constant
#: (up to rounding: centring n equal float32 rows in float64 leaves about 1e-16 of them).
CONSTANT_RELATIVE = 1e-10


def undefined_settings(h: np.ndarray, stats: Sequence[Any] | None) -> dict[int, str]:
    """``{setting index: reason}`` for settings CKA is undefined for (their Gram matrix is zero).

    Constant features give a zero Gram matrix once centred; rounding leaves a tiny positive
    self-HSIC, which would turn into a number that looks meaningful, so it is found from the
    moments (when the route computed them) as well as from a self-HSIC that is not positive.
    """
    out: dict[int, str] = {}
    for i, m in enumerate(stats or ()):
        raw = m.total + m.n * float(np.square(m.mean).sum())
        if m.total <= CONSTANT_RELATIVE * raw:
            out[i] = "its features are constant over the samples (a zero Gram matrix)"
    for i in range(len(h)):
        if i not in out and not h[i, i] > 0:
            out[i] = "its self-HSIC is not positive (degenerate features: a zero Gram matrix)"
    return out


def cka(x: Any, y: Any, **options: Any) -> CKAResult:
    """CKA between two feature sets (same options as :func:`cka_matrix`); ``.value`` is the number."""
    return cka_matrix([x], [y], **options)


def open_specs(store: FeatureStore, dataset: str, split: str, specs: Sequence[SettingSpec],
               model: str | None = None) -> list[FeatureSetSource]:
    """Open each spec read-only from ``store``; ``model`` applies to extracted settings that name none.

    A model may be named as the store lists it (``random-resnet50``) or as ``extract --model`` was
    given it (``random:resnet50``, ``microsoft/resnet-50``, a folder): ``model_store_name``.
    """
    out = []
    for spec in _every_block(store, dataset, split, specs, model):
        if spec.name is not None:
            fs = store.open_features(dataset=dataset, split=split, name=spec.name, model=spec.model)
        else:
            fs = store.open_features(dataset=dataset, split=split, block=spec.block, t=spec.t, pool=spec.pool,
                                     model=spec.model or model)
        out.append(FeatureSetSource(fs))
    return out


def _every_block(store: FeatureStore, dataset: str, split: str, specs: Sequence[SettingSpec],
                 model: str | None) -> list[SettingSpec]:
    """``specs`` with each ``block=*`` replaced by one spec per stored block matching its other keys, in block order."""
    from diffeat.store.reader import matching

    out: list[SettingSpec] = []
    listed = None
    for spec in specs:
        if not spec.all_blocks:
            out.append(spec)
            continue
        if listed is None:
            listed = [s for s in store.list_settings() if s.dataset == dataset and s.split == split]
        want = {"model": spec.model or model, "t": spec.t, "pool": spec.pool}
        blocks = sorted({s.block for s in matching(listed, **want) if s.block is not None})
        if not blocks:
            store.find(dataset=dataset, split=split, **want)  # raises, saying what the store holds
        out += [SettingSpec(b, spec.t, spec.pool, spec.model or model) for b in blocks]
    return out


def run_cka(config: CkaConfig, *, store: FeatureStore | None = None) -> CKAResult:
    """CKA between settings of a store (opened read-only: nothing is ever written to it).

    The rows are ``config.rows()``, the columns ``config.cols()`` (default: the rows);
    ``config.scheduler``/``config.workers`` compute the exact linear routes on a dask cluster
    (:mod:`diffeat.cka.cluster`). With ``config.out``, the matrix, heatmap and record are
    written there (:func:`diffeat.cka.output.write_outputs`; their paths in ``result.files``).
    The result's ``config`` records the options.
    """
    from diffeat.cka.output import write_outputs
    from diffeat.runtime.cluster import cluster_client
    from diffeat.runtime.threads import compute_threads
    from diffeat.store import as_store

    c = config
    fs = as_store(store if store is not None else c.store, mode="r", storage_options=c.storage_options)
    if c.split is None:
        c = c.replace(split=fs.test_split(c.dataset))
    rows = open_specs(fs, c.dataset, c.split, c.rows(), c.model)
    cols = rows if c.cols() is None else open_specs(fs, c.dataset, c.split, c.cols(), c.model)
    both = leave_out_skipped([*rows, *cols])  # the same rows of every setting, or the pairs would not align
    rows, cols = both[:len(rows)], both[len(rows):]
    scheduler, workers = c.scheduler, c.workers
    if scheduler is not None or workers is not None:
        single = {"RBF CKA": c.kernel != "linear", "--route minibatch": c.route == "minibatch",
                  "--subsample (the subset is held in memory)": c.subsample is not None}
        reason = next((k for k, v in single.items() if v), None)
        if reason:
            logger.warning("%s runs in this process: only the exact linear routes (features, gram) use "
                           "--scheduler/--workers", reason)
            scheduler = workers = None
    with cluster_client(scheduler, workers) as client, compute_threads(c.threads):
        result = cka_matrix(rows, cols, kernel=c.kernel, estimator=c.estimator, route=c.route,
                            rbf_threshold=c.rbf_threshold, batch_size=c.batch_size, passes=c.passes, seed=c.seed,
                            precision=c.precision, memory_budget=c.memory_budget, subsample=c.subsample,
                            block_rows=c.block_rows, client=client)
    result.config = {**c.as_dict(), "store": fs.location, "a": [str(s) for s in c.rows()],
                     "b": None if c.cols() is None else [str(s) for s in c.cols()]}
    if c.scheduler is not None or c.workers is not None:
        result.config["cluster_used"] = bool(result.plan.get("cluster", {}).get("used"))
    if c.out is not None:
        result.files = write_outputs(result, c.out, title=c.title)
    return result


def store_cka(store: str | FeatureStore, dataset: str, split: str, a: Sequence[SettingSpec | str],
              b: Sequence[SettingSpec | str] | None = None, **options: Any) -> CKAResult:
    """CKA between settings ``a`` (rows) and ``b`` (columns; default ``a``) of a store.

    A thin adapter over :func:`run_cka`: ``options`` are the other fields of
    :class:`~diffeat.cka.config.CkaConfig` (``model``, ``route``, ``scheduler`` ...).
    """
    from diffeat.store.reader import store_option

    if not a:
        raise DiffeatError("no settings to compare: give --a/--b, or --block/--t/--pool, or --name")
    options, opened = store_option({**options, "store": store})
    config = CkaConfig(dataset=dataset, split=split, a=tuple(str(s) for s in a), b=tuple(str(s) for s in b or ()),
                       **options)
    return run_cka(config, store=opened)
