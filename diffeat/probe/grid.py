"""The trained heads of one setting: build the grid, train it in one pass, select, refit, test."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffeat.errors import DiffeatError
from diffeat.heads import HeadSpec, Probe, Standardize, count_parameters
from diffeat.probe.config import ProbeConfig
from diffeat.probe.data import RowSource, mean_sq_norm
from diffeat.probe.results import HeadResult
from diffeat.probe.train import (
    MOMENTUM,
    GridPoint,
    exported,
    make_trainers,
    metrics,
    predict,
    train,
)
from diffeat.store.layout import setting_label
from diffeat.store.streaming import RunningMoments

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

MEMORY_EPOCHS = 10  # SGD's memory under L2 decay, in epochs, that the linear grid's rates respect
#: The smallest batch the grid trains with when it shrinks the batch for small data.
MIN_BATCH = 32


@dataclass
class ProbeRun:
    """A probe run's options record plus what was resolved from it (see ``diffeat.probe.run``)."""

    config: ProbeConfig
    specs: list[HeadSpec]  # the heads asked for, from the registry
    device: torch.device
    budget: int  # bytes a split may take in memory before it is streamed
    client: Client | None = None  # a dask client for the statistics pass of streamed splits (probe.cluster)


def trained_heads(specs: list[HeadSpec], train_src: RowSource, test_src: RowSource, fit_rows: np.ndarray,
                  val_rows: np.ndarray, rows_final: np.ndarray, test_rows: np.ndarray, m_fit: RunningMoments,
                  std_fit: Standardize, std_all: Standardize, shape: tuple[int, ...], k: int, base: dict,
                  o: ProbeRun) -> list[tuple[HeadResult, Probe]]:
    """Every trained head of one setting: ``(result, final probe)`` per head, in the order of ``specs``.

    The grid (head × lr × wd) trains in one pass per epoch on the fit rows, standardised
    with ``std_fit``; each head's grid point is chosen on the validation rows
    (:func:`select`), refit on ``rows_final`` with ``std_all`` when ``o.config.refit``, and the
    final heads are evaluated on the test rows in one pass. ``base`` holds the setting's
    model/dataset/block/t/pool/name for the results.
    """
    sq_norm = mean_sq_norm(m_fit, std_fit.mean, std_fit.inv_std)
    batch = train_batch(len(fit_rows), o.config, convex=any(s.convex for s in specs))
    steps_per_epoch = math.ceil(len(fit_rows) / batch)
    points = []
    for s in specs:
        options = tuple(sorted({**s.defaults(shape), **o.config.head_options.get(s.name, {})}.items()))
        if o.config.wds is not None:
            wds = o.config.wds
        elif s.cs:
            wds = [1.0 / (c * len(fit_rows)) for c in s.cs]
        else:
            wds = list(s.wds)
        if o.config.lrs:
            lrs = o.config.lrs
        elif s.etas:
            lrs = [eta / max(sq_norm, 1e-12) for eta in s.etas]
        else:
            lrs = list(s.lrs)
        for wd in wds:
            if s.etas and not o.config.lrs:
                # Cap the rate so that SGD's memory, (1 - momentum) / (lr · wd) steps, spans
                # MEMORY_EPOCHS epochs: with a strong L2 term and a larger rate the weights only
                # reflect the last few batches, and even tail averaging leaves them re-weighting
                # samples at random (measured on the probe benchmark at C = 3e-5: 51.7 % uncapped,
                # 52.8 % with 3 epochs, 53.8 % with 10, 54.6 % for L-BFGS). Capped rates that
                # coincide are trained once.
                cap = (1.0 - MOMENTUM) / (max(wd, 1e-30) * MEMORY_EPOCHS * steps_per_epoch)
                wd_lrs = sorted({min(lr, cap) for lr in lrs})
            else:
                wd_lrs = list(lrs)
            points += [GridPoint(s, lr, wd, options) for lr in wd_lrs]

    epochs = max(o.config.epochs, math.ceil(o.config.min_steps / steps_per_epoch))

    def hparams(p: GridPoint) -> dict:
        # C: the scikit-learn C with the same L2 strength (SGD objective CE + wd/2 ‖W‖²).
        c = {"C": 1.0 / (p.wd * len(fit_rows))} if p.spec.convex and p.spec.optimizer == "sgd" and p.wd > 0 else {}
        eta = {"eta": p.lr * sq_norm} if p.spec.etas else {}  # the lr as a multiple of 1 / E‖x‖²
        return {"lr": p.lr, "wd": p.wd, **c, **eta, **_plain(dict(p.options)), "optimizer": p.spec.optimizer,
                "epochs": epochs, "batch_size": batch, "standardize": o.config.standardize}

    torch.manual_seed(o.config.seed)
    trainers = make_trainers(points, shape, k, o.device)
    logger.debug("training %d heads in one pass: %s", len(points),
                ", ".join(f"{s.name} x{sum(p.spec is s for p in points)}" for s in specs))
    label = setting_label(base.get("block"), base.get("t"), base.get("pool"), base.get("name"))
    seconds = train(train_src, fit_rows, trainers, std_fit, epochs=epochs, batch_size=batch,
                    seed=o.config.seed, device=o.device, desc=f"probe {label}: grid", progress=o.config.progress)
    modules = exported(points, trainers)
    objectives = _objectives(points, modules, train_src, fit_rows, std_fit, o)
    y_val, val_top, val_loss = predict(train_src, val_rows, modules, std_fit, batch_size=max(o.config.batch_size, 1024),
                                       device=o.device)
    val_scores = [metrics(y_val, top, k, loss) for top, loss in zip(val_top, val_loss)]
    diverged = []
    for p, v, module, obj in zip(points, val_scores, modules, objectives):
        finite = all(bool(torch.isfinite(t).all()) for t in module.state_dict().values())
        diverged.append(not finite or (p.spec.convex and not np.isfinite(obj)))
        if diverged[-1]:
            # Too large a learning rate for these features: the head blew up. It stays in the
            # grid (recorded as diverged) but can never be chosen.
            v.update(top1=float("nan"), top5=float("nan"), balanced_acc=float("nan"), loss=float("nan"))
    _log_diverged(points, diverged, label)
    chosen: dict[str, int] = {}
    candidates: set[int] = set()
    for s in specs:
        chosen[s.name], cands = select(s, points, val_scores, objectives, diverged)
        candidates.update(cands)
    if o.config.refit:
        # A convex head keeps its C on the larger train + val set (as scikit-learn's refit does):
        # wd = 1 / (C · n) shrinks with n.
        scale = len(fit_rows) / len(rows_final)
        best = [dataclasses.replace(points[i], wd=points[i].wd * scale) if points[i].spec.convex else points[i]
                for i in chosen.values()]
        torch.manual_seed(o.config.seed + 1)
        refits = make_trainers(best, shape, k, o.device)
        seconds += train(train_src, rows_final, refits, std_all, epochs=epochs, batch_size=batch,
                         seed=o.config.seed + 1, device=o.device, desc=f"probe {label}: refit",
                         progress=o.config.progress)
        finals = exported(best, refits)
    else:
        finals = [modules[i] for i in chosen.values()]
    std_final = std_all if o.config.refit else std_fit
    y_test, test_top, test_loss = predict(test_src, test_rows, finals, std_final,
                                          batch_size=max(o.config.batch_size, 1024), device=o.device)
    results = []
    for (h, i), module, top, loss in zip(chosen.items(), finals, test_top, test_loss):
        grid = [{"hparams": hparams(p), "val": val_scores[j], "objective": objectives[j], "diverged": diverged[j],
                 "candidate": j in candidates} for j, p in enumerate(points) if p.spec.name == h]
        result = HeadResult(h, **base, hparams=hparams(points[i]), val=val_scores[i],
                            test=metrics(y_test, top, k, loss),
                            grid=grid, refit=o.config.refit, n_train=len(rows_final), seconds=seconds,
                            n_params=count_parameters(module))
        results.append((result, Probe(Standardize(std_final.mean, std_final.inv_std), module).eval()))
    return results


def train_batch(n_fit: int, config: ProbeConfig, *, convex: bool = False) -> int:
    """The batch the grid trains with: ``batch_size``, or smaller on small data (not below ``MIN_BATCH``).

    The grid trains ``epochs`` epochs but at least ``min_steps`` steps. With a fixed batch, a
    small split reaches the steps only by running many more epochs (1,293 digits rows at batch
    256: 167 epochs instead of 30, twice, for grid and refit). A smaller batch gives the same
    steps in ``epochs`` epochs at the same cost per epoch; the epochs grow only below
    ``MIN_BATCH · min_steps / epochs`` rows (about 1,070 at the defaults). On ImageNet-sized
    splits the batch stays ``batch_size`` and the recipe is unchanged. A grid with a linear (convex)
    SGD head keeps ``batch_size``: its learning rates and their caps are tuned per step at that
    batch (measured on digits: 0.8 points below logistic regression at the shrunk batch).
    """
    if convex:
        return config.batch_size
    wanted = math.ceil(n_fit * config.epochs / max(1, config.min_steps))
    return max(min(config.batch_size, MIN_BATCH), min(config.batch_size, wanted))


def _log_diverged(points: list[GridPoint], diverged: list[bool], label: str) -> None:
    """One warning per head whose grid has diverged points (they are kept in the results, never chosen)."""
    for name in dict.fromkeys(p.spec.name for p in points):
        idx = [i for i, p in enumerate(points) if p.spec.name == name]
        bad = [points[i] for i in idx if diverged[i]]
        if bad:
            lrs = ", ".join(f"{lr:g}" for lr in sorted({p.lr for p in bad}))
            logger.warning("%s: %d of %d %s grid points diverged (lr %s): never chosen; --lr sets smaller rates",
                           label, len(bad), len(idx), name, lrs)


def _objectives(points: list[GridPoint], modules: list[torch.nn.Module], source: RowSource, fit_rows: np.ndarray,
                std_fit: Standardize, o: ProbeRun) -> list[float]:
    """The regularised training objective ``CE(fit rows) + wd/2 ‖W‖²`` of each convex head (NaN for others).

    One forward pass over the fit rows for the convex heads of the grid: exact, where the
    minibatch losses seen during training would describe the iterates, not the averaged
    weights that are kept.
    """
    convex = [i for i, p in enumerate(points) if p.spec.convex]
    out = [float("nan")] * len(points)
    if not convex:
        return out
    _, _, losses = predict(source, fit_rows, [modules[i] for i in convex], std_fit,
                           batch_size=max(o.config.batch_size, 1024), device=o.device)
    for i, loss in zip(convex, losses):
        sq = sum(float((m.weight.detach() ** 2).sum()) for m in modules[i].modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        out[i] = loss + points[i].wd / 2 * sq
    return out


def select(spec: HeadSpec, points: list[GridPoint], val: list[dict], objectives: list[float],
           diverged: list[bool]) -> tuple[int, list[int]]:
    """The grid point of head ``spec`` chosen on validation (best top-1, ties to the lower loss), and
    the candidates it was chosen from (indices into ``points``).

    Convex heads (linear): the learning rate only decides how far SGD got towards the
    optimum of ``CE + wd/2 ‖W‖²``, so for each weight decay only the learning rate that
    reached the lowest training objective is a candidate; the weight decay (the
    regulariser, as C is for logistic regression) is then chosen on validation.
    Selecting over every (lr, wd) instead adds early-stopped candidates that win on a
    small validation split by chance (measured on digits: 0.6–0.8 points below logistic
    regression on average). Other heads: the whole grid. Top-1 on a few hundred
    validation rows ties often; the validation cross-entropy breaks ties (then the
    larger weight decay, then the first grid point).
    """
    idx = [i for i, p in enumerate(points) if p.spec is spec and not diverged[i]]
    if not idx:
        raise DiffeatError(f"every {spec.name} head of the grid diverged: give smaller learning rates (--lr)")
    if spec.convex:
        per_wd: dict[float, int] = {}
        for i in idx:
            wd = points[i].wd
            if wd not in per_wd or objectives[i] < objectives[per_wd[wd]]:
                per_wd[wd] = i
        idx = [per_wd[wd] for wd in sorted(per_wd, reverse=True)]
    best = idx[0]
    for i in idx[1:]:
        if (val[i]["top1"], -val[i]["loss"]) > (val[best]["top1"], -val[best]["loss"]):
            best = i
    return best, idx


def _plain(options: dict) -> dict:
    """Options as JSON-friendly values (tuples -> lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
