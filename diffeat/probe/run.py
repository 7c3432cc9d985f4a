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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffeat.devices import resolve_device
from diffeat.errors import DiffeatError, StoreError
from diffeat.heads import HEADS, Probe, Standardize, build_head, check_head, count_parameters, get_head
from diffeat.probe import reference
from diffeat.probe.data import STANDARDIZE_MODES, make_source, moments, parse_bytes, stratified_split
from diffeat.probe.grid import Options, trained_heads
from diffeat.probe.results import CSV_COLUMNS, HeadResult, ProbeReport, csv_rows, save_heads
from diffeat.probe.train import metrics, predict
from diffeat.report import new_run_dir, utc_now, write_long_csv, write_run_json
from diffeat.store import FeatureSet, FeatureStore, open_store

logger = logging.getLogger(__name__)


def _check_numbers(values: Sequence[float] | None, option: str, *, positive: bool) -> list[float] | None:
    if values is None or len(values) == 0:
        return None
    bad = [v for v in values if not np.isfinite(v) or (v <= 0 if positive else v < 0)]
    if bad:
        raise DiffeatError(f"{option} values must be {'> 0' if positive else '>= 0'} and finite, not {bad}")
    return [float(v) for v in values]


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


def probe(
    *,
    store: str | Path | FeatureStore,
    dataset: str,
    heads: Sequence[str] = ("linear",),
    blocks: Sequence[int] | None = None,
    ts: Sequence[int] | None = None,
    pools: Sequence[int] | None = None,
    model: str | None = None,
    name: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    val_fraction: float = 0.1,
    lrs: Sequence[float] | None = None,
    wds: Sequence[float] | None = None,
    epochs: int = 30,
    min_steps: int = 1000,
    batch_size: int = 256,
    standardize: str = "feature",
    refit: bool = True,
    head_options: dict[str, dict] | None = None,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    cs: Sequence[float] | None = None,
    device: str = "auto",
    memory_budget: str | int | None = None,
    seed: int = 0,
    out: str | Path = "results",
    save_weights: bool = True,
    storage_options: dict | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> ProbeReport:
    """Train and evaluate heads on cached features; write results under ``out``.

    Args:
        store: feature store path, fsspec URL or open ``FeatureStore`` (read only).
        dataset: dataset name in the store.
        heads: head names from ``diffeat.heads.HEADS`` (trained: linear, mlp, cnn,
            attention; reference: knn, logistic). Trained heads share one data pass.
        blocks, ts, pools: settings to probe (their product); None matches whatever
            single value the store holds.
        model: model name; may be omitted when the store holds one model.
        name: an imported feature set's name (instead of block/t/pool).
        train_split, test_split: the store's split names.
        val_fraction: fraction of each class of train held out for selection.
        lrs, wds: learning rates × weight decays of the grid (None: each head's defaults).
        epochs, batch_size: training length and batch size (shared by the grid).
        min_steps: train at least this many optimiser steps (more epochs on small
            datasets: with 6 batches per epoch, 30 epochs stop far from the optimum).
        standardize: "feature" (z-score every feature), "channel" (per channel of the
            map) or "none"; statistics come from training rows only.
        refit: retrain the chosen grid point on train + val before testing.
        head_options: per-head module options, e.g. ``{"mlp": {"hidden": [1024]}}``.
        knn_k, knn_temperature: the kNN evaluator's k and T.
        cs: logistic regression's C grid (None: 1e-5 … 10, factor 10).
        device: "cpu", "cuda", "cuda:N" or "auto".
        memory_budget: bytes (or "8G") a split may take in RAM before it is streamed.
        seed: seeds the validation split, head initialisation and batch order.
        out: results directory; a run directory is created in it.
        save_weights: write each final head as safetensors.
        storage_options: fsspec options for a remote store.
        scheduler, workers: a dask scheduler address, or a local cluster of that many
            processes, for the statistics pass of splits streamed from the store
            (``diffeat.probe.cluster``); training stays in this process.

    Returns:
        A :class:`ProbeReport`.

    Raises:
        DiffeatError / StoreError: before any training, for a setting that is not in
        the store or not complete, mismatched splits, an unknown head or option, or a
        head that cannot take the setting's pool size.
    """
    started, t0 = utc_now(), time.perf_counter()
    # ---- everything a user can get wrong is checked here, before any training ----
    head_names = list(dict.fromkeys(heads))
    if not head_names:
        raise DiffeatError(f"give at least one --head ({', '.join(HEADS)})")
    specs = [get_head(h) for h in head_names]
    if standardize not in STANDARDIZE_MODES:
        raise DiffeatError(f"--standardize must be one of {', '.join(STANDARDIZE_MODES)}, not {standardize!r}")
    if epochs < 1 or batch_size < 2 or min_steps < 0:
        raise DiffeatError(f"--epochs must be >= 1, --batch-size >= 2 and --min-steps >= 0 "
                           f"(got {epochs}, {batch_size}, {min_steps})")
    if not 0.0 < val_fraction < 1.0:
        raise DiffeatError(f"--val-fraction must be in (0, 1), not {val_fraction}")
    if knn_k < 1 or knn_temperature <= 0:
        raise DiffeatError(f"--knn-k must be >= 1 and --knn-t > 0 (got {knn_k}, {knn_temperature})")
    lr_grid = _check_numbers(lrs, "--lr", positive=True)
    wd_grid = _check_numbers(wds, "--wd", positive=False)
    c_grid = _check_numbers(cs, "--C", positive=True)
    head_options = {k: dict(v) for k, v in (head_options or {}).items()}
    for h in head_options:
        get_head(h)
    budget = parse_bytes(memory_budget)
    dev = resolve_device(device)
    from diffeat.cluster import check_cluster_options

    check_cluster_options(scheduler, workers)

    fs = store if isinstance(store, FeatureStore) else open_store(store, mode="r", storage_options=storage_options)
    pairs: dict[str, tuple[FeatureSet, FeatureSet]] = {}
    for b, t, p in itertools.product(blocks or [None], ts or [None], pools or [None]):
        tr, te = _pair(fs, dataset, train_split, test_split, b, t, p, model, name)
        pairs.setdefault(tr.info.path, (tr, te))
    for tr, _ in pairs.values():
        shape = tuple(tr.array.shape[1:])
        for spec in specs:
            check_head(spec.name, shape)
            if spec.kind == "trained":
                with torch.device("meta"):  # validates options and shapes without allocating
                    build_head(spec.name, shape, len(tr.class_names), **head_options.get(spec.name, {}))
            if spec.name == "logistic" and 2 * 4 * tr.nbytes // tr.array.dtype.itemsize > budget:
                raise DiffeatError(
                    f"logistic needs {tr.info.split} of {tr.info.label()} in memory as float32 "
                    f"({8 * tr.nbytes // tr.array.dtype.itemsize / 2**30:.1f} GiB with its standardised copy) but "
                    f"--memory-budget is {budget / 2**30:.1f} GiB: raise it, or use --head linear (streams)")
    run_dir = new_run_dir(out, "probe")
    config = {
        "store": fs.location, "dataset": dataset, "heads": head_names, "blocks": blocks, "ts": ts, "pools": pools,
        "model": model, "name": name, "train_split": train_split, "test_split": test_split,
        "val_fraction": val_fraction, "lrs": lr_grid, "wds": wd_grid, "epochs": epochs, "min_steps": min_steps,
        "batch_size": batch_size,
        "standardize": standardize, "refit": refit, "head_options": head_options, "knn_k": knn_k,
        "knn_temperature": knn_temperature, "cs": c_grid, "device": str(dev), "memory_budget": budget,
        "seed": seed, "out": str(out), "save_weights": save_weights,
        "settings": [tr.info.as_dict() for tr, _ in pairs.values()],
        "defaults": {s.name: {"optimizer": s.optimizer, "lrs": s.lrs, "wds": s.wds, "etas": s.etas, "cs": s.cs,
                               "options": s.options}
                     for s in specs},
    }
    report = ProbeReport(run_dir=run_dir, config=config)
    logger.info("probe run %s: %d setting(s) x heads %s", run_dir, len(pairs), head_names)

    # ---- training ----
    from diffeat.cluster import cluster_client

    with cluster_client(scheduler, workers) as client:
        opts = Options(specs, lr_grid, wd_grid, c_grid, head_options, epochs, min_steps, batch_size, standardize,
                       refit, val_fraction, knn_k, knn_temperature, dev, budget, seed, client)
        for tr, te in pairs.values():
            outcomes = _probe_setting(tr, te, opts)
            if save_weights:
                save_heads(run_dir, tr, outcomes)
            results = [r for r, _ in outcomes]
            rows = [row for r in results for row in csv_rows(run_dir.name, r, train_split, test_split)]
            # Appended per setting, so a long multi-setting run keeps what it finished if it dies.
            write_long_csv(run_dir / "results.csv", rows, CSV_COLUMNS, append=True)
            report.results.extend(results)
    report.seconds = time.perf_counter() - t0
    write_run_json(run_dir / "run.json", stage="probe", config=config, started=started, seconds=report.seconds,
                   results=[{**r.summary(), "grid": r.grid, "val": r.val, "test": r.test, "n_params": r.n_params}
                            for r in report.results])
    return report


def _probe_setting(train_fs: FeatureSet, test_fs: FeatureSet, o: Options) -> list[tuple[HeadResult, Probe | None]]:
    """Every head on one setting: ``(result, final probe or None for knn)`` in the order asked."""
    info = train_fs.info
    shape = tuple(train_fs.array.shape[1:])
    k = len(train_fs.class_names)
    start = time.perf_counter()
    train_src = make_source(train_fs, o.budget, o.device)
    left = o.budget - (train_fs.nbytes if train_src.in_memory else 0)
    test_src = make_source(test_fs, max(0, left), o.device)
    fit_rows, val_rows = stratified_split(train_src.labels, o.val_fraction, o.seed)
    all_rows = np.arange(len(train_src), dtype=np.int64)
    test_rows = np.arange(len(test_src), dtype=np.int64)
    if o.client is not None and not train_src.in_memory:
        from diffeat.probe.cluster import cluster_moments

        m_fit, m_val = cluster_moments(o.client, train_fs, train_src, fit_rows, val_rows)
    else:
        m_fit, m_val = moments(train_src, fit_rows, val_rows)
    std_fit = Standardize(*m_fit.standardizer(o.standardize))
    std_all = Standardize(*m_fit.combined(m_val).standardizer(o.standardize)) if o.refit else std_fit
    rows_final = all_rows if o.refit else fit_rows
    logger.info("%s: %d train rows (%d fit, %d val), %d test rows, %d classes, features %s, %s",
                info.label(), len(all_rows), len(fit_rows), len(val_rows), len(test_rows), k, shape,
                "in memory" if train_src.in_memory else "streamed")
    base = {"model": info.model, "dataset": info.dataset, "block": info.block, "t": info.t, "pool": info.pool,
            "name": info.name}
    results: list[tuple[HeadResult, Probe | None]] = []
    trained = [s for s in o.specs if s.kind == "trained"]
    if trained:
        results += trained_heads(trained, train_src, test_src, fit_rows, val_rows, rows_final, test_rows,
                                  m_fit, std_fit, std_all, shape, k, base, o)
    for spec in o.specs:
        t_head = time.perf_counter()
        if spec.name == "knn":
            _, val_top = reference.knn_topk(train_src, fit_rows, train_src, val_rows, std_fit, num_classes=k,
                                            k=o.knn_k, temperature=o.knn_temperature, device=o.device)
            test_labels, test_top = reference.knn_topk(train_src, rows_final, test_src, test_rows, std_all,
                                                       num_classes=k, k=o.knn_k, temperature=o.knn_temperature,
                                                       device=o.device)
            hp = {"k": o.knn_k, "temperature": o.knn_temperature, "metric": "cosine", "standardize": o.standardize}
            val = metrics(train_src.labels[val_rows], val_top, k)
            results.append((HeadResult("knn", **base, hparams=hp, val=val, test=metrics(test_labels, test_top, k),
                                       grid=[{"hparams": hp, "val": val}], refit=o.refit, n_train=len(rows_final),
                                       seconds=time.perf_counter() - t_head), None))
        elif spec.name == "logistic":
            cs = tuple(o.cs or spec.options["cs"])
            out = reference.logistic(train_src, fit_rows, val_rows, std_fit, std_all, cs=cs, num_classes=k,
                                     refit=o.refit)
            y_val = train_src.labels[val_rows]
            grid = [{"hparams": {**e["hparams"], "standardize": o.standardize},
                     "val": metrics(y_val, e["val_topk"], k, e["val_loss"]), "converged": e["converged"],
                     "n_iter": e["n_iter"]}
                    for e in out["grid"]]
            test_labels, (test_top,), (test_loss,) = predict(test_src, test_rows, [out["probe"]], nn.Identity(),
                                                             batch_size=o.batch_size, device=torch.device("cpu"))
            hp = {**out["chosen"]["hparams"], "standardize": o.standardize}
            result = HeadResult("logistic", **base, hparams=hp, val=metrics(y_val, out["chosen"]["val_topk"], k,
                                                                           out["chosen"]["val_loss"]),
                                test=metrics(test_labels, test_top, k, test_loss), grid=grid, refit=o.refit,
                                n_train=out["n_train"], seconds=time.perf_counter() - t_head,
                                n_params=count_parameters(out["probe"].head))
            results.append((result, out["probe"]))
    order = {s.name: i for i, s in enumerate(o.specs)}
    results.sort(key=lambda rp: order[rp[0].head])
    logger.info("%s done in %.1f s: %s", info.label(), time.perf_counter() - start,
                ", ".join(f"{r.head} {100 * r.test['top1']:.2f}%" for r, _ in results))
    return results


__all__ = ["CSV_COLUMNS", "HeadResult", "ProbeReport", "probe", "resolve_device"]
