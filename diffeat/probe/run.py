"""The probe stage: heads trained on cached features, chosen on validation, tested once.

``probe(...)`` resolves every requested setting and checks every option before
any training (so a typo fails in seconds, not after an hour), then for each
setting:

1. carves a seeded, stratified validation split out of the train split;
2. computes standardisation statistics (float64, streaming) on training rows only;
3. trains the grid of every trained head (head × lr × wd) in one pass per epoch;
4. picks the best grid point per head on validation, refits it on train + val
   (``refit=True``), and evaluates the test split once;
5. runs the reference evaluators asked for (kNN, logistic regression);
6. appends long-format rows to ``results.csv`` and saves each final head.

Nothing is ever written to the store (it is opened read-only).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from diffeat.errors import DiffeatError, StoreError
from diffeat.heads import (
    Probe,
    Standardize,
    build_head,
    check_head,
    count_parameters,
    get_head,
)
from diffeat.output.records import new_run_dir, utc_now, write_long_csv, write_run_json
from diffeat.probe import lbfgs, reference
from diffeat.probe.config import ProbeConfig
from diffeat.probe.data import (
    RowSource,
    make_source,
    moments,
    standardizer,
    stratified_split,
)
from diffeat.probe.grid import ProbeRun, trained_heads
from diffeat.probe.results import (
    CSV_COLUMNS,
    HeadResult,
    ProbeReport,
    csv_rows,
    save_heads,
)
from diffeat.probe.train import metrics, predict
from diffeat.runtime.cluster import cluster_client
from diffeat.runtime.devices import resolve_device
from diffeat.runtime.memory import fmt_bytes, memory_budget
from diffeat.runtime.threads import compute_threads
from diffeat.store import FeatureSet, FeatureStore, as_store
from diffeat.store.reader import store_option

logger = logging.getLogger(__name__)


def _pair(fs: FeatureStore, dataset: str, train_split: str, test_split: str, block, t, pool, model, name
          ) -> tuple[FeatureSet, FeatureSet]:
    """Open a setting's train and test arrays and check they belong together."""
    train = fs.open_features(dataset=dataset, split=train_split, block=block, t=t, pool=pool, model=model,
                             name=name)
    i = train.info
    test = fs.open_features(dataset=dataset, split=test_split, block=i.block, t=i.t, pool=i.pool, model=i.model,
                            name=i.name)
    if tuple(train.array.shape[1:]) != tuple(test.array.shape[1:]):
        raise StoreError(f"{i.label()}: train features have shape {train.array.shape[1:]} but test features "
                         f"{test.array.shape[1:]}")
    if list(train.class_names) != list(test.class_names):
        raise StoreError(f"{dataset}: the class names of split {train_split!r} ({len(train.class_names)}) and "
                         f"{test_split!r} ({len(test.class_names)}) differ; labels would not mean the same class")
    k = len(train.class_names)
    for split, fset in ((train_split, train), (test_split, test)):
        if len(fset.labels) and (fset.labels.min() < 0 or fset.labels.max() >= k):
            raise StoreError(f"{dataset}/{split}: labels outside 0..{k - 1}")
    if len(np.unique(train.labels)) < 2:
        raise DiffeatError(f"{dataset}/{train_split} has fewer than two classes: nothing to classify")
    missing = sorted(set(np.unique(test.labels)) - set(np.unique(train.labels)))
    if missing:
        logger.warning("%s: %d test classes have no training rows (e.g. %s)", dataset, len(missing),
                       [train.class_names[c] for c in missing[:3]])
    return train, test


def probe(**options: Any) -> ProbeReport:
    """Train and evaluate heads on cached features: ``probe(store=..., dataset=..., heads=["linear"])``.

    The keyword arguments are the fields of :class:`~diffeat.probe.config.ProbeConfig` (one
    record for the CLI, the library and pipelines); ``store`` may also be an open
    ``FeatureStore``. See :func:`run_probe`.
    """
    options, store = store_option(options)
    return run_probe(ProbeConfig(**options), store=store)


def run_probe(config: ProbeConfig, *, store: FeatureStore | None = None) -> ProbeReport:
    """Train and evaluate heads on cached features; write results under ``config.out``.

    Heads are names from ``diffeat.heads.HEADS`` (trained: linear, mlp, cnn, attention;
    reference: knn, logistic); trained heads share one data pass. The store (``store``, or
    ``config.store`` opened read-only) is never written to.

    Returns:
        A :class:`ProbeReport`.

    Raises:
        DiffeatError / StoreError: before any training, for a setting that is not in
        the store or not complete, mismatched splits, an unknown head or option, or a
        head that cannot take the setting's pool size.
    """
    started, t0 = utc_now(), time.perf_counter()
    c = config
    # ---- everything a user can get wrong is checked here, before any training ----
    specs = [get_head(h) for h in c.heads]
    budget = memory_budget(c.memory_budget)
    dev = resolve_device(c.device)
    fs = as_store(store if store is not None else c.store, mode="r", storage_options=c.storage_options)
    if c.train_split is None or c.test_split is None:
        train_split, test_split = fs.standard_pair(c.dataset)
        c = c.replace(train_split=c.train_split or train_split, test_split=c.test_split or test_split)
    pairs: dict[str, tuple[FeatureSet, FeatureSet]] = {}
    for b, t, p in itertools.product(c.blocks or [None], c.ts or [None], c.pools or [None]):
        tr, te = _pair(fs, c.dataset, c.train_split, c.test_split, b, t, p,
                       c.model, c.name)
        pairs.setdefault(tr.info.path, (tr, te))
    for tr, _ in pairs.values():
        shape = tuple(tr.array.shape[1:])
        for spec in specs:
            check_head(spec.name, shape)
            if spec.kind == "trained":
                with torch.device("meta"):  # validates options and shapes without allocating
                    build_head(spec.name, shape, len(tr.class_names), **c.head_options.get(spec.name, {}))
            need = reference.logistic_bytes(len(tr), int(np.prod(shape)), len(tr.class_names))
            if spec.name == "logistic" and need > budget:
                raise DiffeatError(
                    f"logistic needs about {fmt_bytes(need)} for {tr.info.split} of {tr.info.label()} ({len(tr)} x "
                    f"{int(np.prod(shape))} features in memory as float32, and L-BFGS's float64 history of "
                    f"{len(tr.class_names)} x {int(np.prod(shape))} parameters) but --memory-budget is "
                    f"{fmt_bytes(budget)}: raise it, or use --head linear (streams)")
    run_dir = new_run_dir(c.out, "probe")
    record = {
        **c.as_dict(), "store": fs.location, "device": str(dev), "memory_budget": budget,
        "settings": [tr.info.as_dict() for tr, _ in pairs.values()],
        "defaults": {s.name: {"optimizer": s.optimizer, "lrs": s.lrs, "wds": s.wds, "etas": s.etas, "cs": s.cs,
                               "options": s.options}
                     for s in specs},
    }
    report = ProbeReport(run_dir=run_dir, config=record)
    logger.info("probe run %s: %d setting(s) x heads %s", run_dir, len(pairs), list(c.heads))

    # ---- training ----
    with cluster_client(c.scheduler, c.workers) as client, compute_threads(c.threads):
        run = ProbeRun(c, specs, dev, budget, client)
        for tr, te in pairs.values():
            outcomes = _probe_setting(tr, te, run)
            if c.save_weights:
                save_heads(run_dir, tr, outcomes)
            results = [r for r, _ in outcomes]
            rows = [row for r in results for row in csv_rows(run_dir.name, r, c.train_split, c.test_split)]
            # Appended per setting, so a long multi-setting run keeps what it finished if it dies.
            write_long_csv(run_dir / "results.csv", rows, CSV_COLUMNS, append=True)
            report.results.extend(results)
    report.seconds = time.perf_counter() - t0
    write_run_json(run_dir / "run.json", stage="probe", config=record, started=started, seconds=report.seconds,
                   results=[{**r.summary(), "grid": r.grid, "val": r.val, "test": r.test, "n_params": r.n_params,
                             **({"passes": r.passes} if r.passes is not None else {})}
                            for r in report.results])
    return report


def _probe_setting(train_fs: FeatureSet, test_fs: FeatureSet, o: ProbeRun) -> list[tuple[HeadResult, Probe | None]]:
    """Every head on one setting: ``(result, final probe or None for knn)`` in the order asked."""
    info = train_fs.info
    shape = tuple(train_fs.array.shape[1:])
    k = len(train_fs.class_names)
    start = time.perf_counter()
    train_src = make_source(train_fs, o.budget, o.device)
    left = o.budget - (train_fs.nbytes if train_src.in_memory else 0)
    test_src = make_source(test_fs, max(0, left), o.device)
    # Rows whose image could not be decoded at extraction (--on-bad-image skip) are left out, all of them.
    all_rows, test_rows = train_fs.kept_rows(), test_fs.kept_rows()
    left_out = len(train_fs.skipped) + len(test_fs.skipped)
    if left_out:
        logger.warning("%s: leaving out %d rows whose images could not be decoded at extraction (%d train, %d test; "
                       "ids in the setting's attributes)", info.label(), left_out, len(train_fs.skipped),
                       len(test_fs.skipped))
    fit_i, val_i = stratified_split(train_src.labels[all_rows], o.config.val_fraction, o.config.seed)
    fit_rows, val_rows = all_rows[fit_i], all_rows[val_i]
    if o.client is not None and not train_src.in_memory:
        from diffeat.probe.cluster import cluster_moments

        m_fit, m_val = cluster_moments(o.client, train_fs, train_src, fit_rows, val_rows)
    else:
        m_fit, m_val = moments(train_src, fit_rows, val_rows)
    std_fit = Standardize(*standardizer(m_fit, o.config.standardize))
    std_all = Standardize(*standardizer(m_fit.combined(m_val), o.config.standardize)) if o.config.refit else std_fit
    rows_final = all_rows if o.config.refit else fit_rows
    logger.debug("%s: %d train rows (%d fit, %d val), %d test rows, %d classes, features %s, %s",
                info.label(), len(all_rows), len(fit_rows), len(val_rows), len(test_rows), k, shape,
                "in memory" if train_src.in_memory else "streamed")
    base = {"model": info.model, "dataset": info.dataset, "block": info.block, "t": info.t, "pool": info.pool,
            "name": info.name}
    results: list[tuple[HeadResult, Probe | None]] = []
    by_lbfgs = o.config.recipe == "lbfgs"  # the linear head is then fit by L-BFGS, not by the SGD grid
    trained = [s for s in o.specs if s.kind == "trained" and not (by_lbfgs and s.name == "linear")]
    if trained:
        results += trained_heads(trained, train_src, test_src, fit_rows, val_rows, rows_final, test_rows,
                                  m_fit, std_fit, std_all, shape, k, base, o)
    for spec in o.specs:
        t_head = time.perf_counter()
        if spec.name == "linear" and by_lbfgs:
            # What this split may still take in memory beside the row sources already held.
            held = (train_fs.nbytes if train_src.in_memory else 0) + (test_fs.nbytes if test_src.in_memory else 0)
            out = lbfgs.fit(train_src, fit_rows, val_rows, std_fit, std_all, cs=tuple(o.config.cs or spec.cs),
                            num_classes=k, device=o.device, budget=max(0, o.budget - held), refit=o.config.refit)
            results.append(_convex_result("linear", out, {"recipe": "lbfgs"}, train_src.labels[val_rows], test_src,
                                          test_rows, base, k, o, t_head))
        elif spec.name == "knn":
            _, val_top = reference.knn_topk(train_src, fit_rows, train_src, val_rows, std_fit, num_classes=k,
                                            k=o.config.knn_k, temperature=o.config.knn_temperature, device=o.device)
            test_labels, test_top = reference.knn_topk(train_src, rows_final, test_src, test_rows, std_all,
                                                       num_classes=k, k=o.config.knn_k, temperature=o.config.knn_temperature,
                                                       device=o.device)
            hp = {"k": o.config.knn_k, "temperature": o.config.knn_temperature, "metric": "cosine", "standardize": o.config.standardize}
            val = metrics(train_src.labels[val_rows], val_top, k)
            results.append((HeadResult("knn", **base, hparams=hp, val=val, test=metrics(test_labels, test_top, k),
                                       grid=[{"hparams": hp, "val": val}], refit=o.config.refit, n_train=len(rows_final),
                                       seconds=time.perf_counter() - t_head), None))
        elif spec.name == "logistic":
            out = reference.logistic(train_src, fit_rows, val_rows, std_fit, std_all,
                                     cs=tuple(o.config.cs or spec.options["cs"]), num_classes=k, refit=o.config.refit)
            results.append(_convex_result("logistic", out, {}, train_src.labels[val_rows], test_src, test_rows, base,
                                          k, o, t_head))
    order = {s.name: i for i, s in enumerate(o.specs)}
    results.sort(key=lambda rp: order[rp[0].head])
    logger.info("%s done in %.1f s: %s", info.label(), time.perf_counter() - start,
                ", ".join(f"{r.head} {100 * r.test['top1']:.2f}%" for r, _ in results))
    return results


def _convex_result(head: str, out: dict, extra: dict, y_val: np.ndarray, test_src: RowSource,
                   test_rows: np.ndarray, base: dict, k: int, o: ProbeRun, started: float
                   ) -> tuple[HeadResult, Probe]:
    """The result of a head fit along a C path (``lbfgs.fit``, ``reference.logistic``): its grid, the
    chosen C's validation metrics, and the final model's test metrics (one pass over the test rows)."""
    common = {**extra, "standardize": o.config.standardize}
    grid = [{"hparams": {**e["hparams"], **common}, "val": metrics(y_val, e["val_topk"], k, e["val_loss"]),
             "converged": e["converged"], "n_iter": e["n_iter"],
             **({"objective": e["objective"]} if "objective" in e else {})}
            for e in out["grid"]]
    test_labels, (test_top,), (test_loss,) = predict(test_src, test_rows, [out["probe"]], nn.Identity(),
                                                     batch_size=max(o.config.batch_size, 1024), device=o.device)
    chosen = out["chosen"]
    result = HeadResult(head, **base, hparams={**chosen["hparams"], **common},
                        val=metrics(y_val, chosen["val_topk"], k, chosen["val_loss"]),
                        test=metrics(test_labels, test_top, k, test_loss), grid=grid, refit=o.config.refit,
                        n_train=out["n_train"], seconds=time.perf_counter() - started,
                        n_params=count_parameters(out["probe"].head), passes=out.get("passes"))
    return result, out["probe"]


__all__ = ["CSV_COLUMNS", "HeadResult", "ProbeReport", "probe", "run_probe"]
