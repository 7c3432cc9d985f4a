"""Reference evaluators: weighted kNN and scikit-learn logistic regression.

* **kNN** (DINO ``eval_knn.py``): standardise, L2-normalise, cosine top-k neighbours
  from the training bank, votes weighted by ``exp(s / T)``; k = 20, T = 0.07. No
  training; the bank is streamed block by block with a running top-k, so it never
  needs the whole training split in memory.
* **logistic** (CLIP / DINOv2 ``log_regression.py`` protocol): multinomial L2
  logistic regression with L-BFGS on standardised features, C chosen on the
  validation split (a warm-started path over a factor-10 grid, then the two
  half-decade neighbours of the best), refit on fit + validation rows with a tight
  tolerance. Needs the training split in memory.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffeat.heads import LinearHead, Probe, Standardize
from diffeat.probe.data import RowSource
from diffeat.probe.train import TOPK

logger = logging.getLogger(__name__)


def _normalised(x: np.ndarray, standardize: nn.Module, device: torch.device) -> torch.Tensor:
    t = standardize(torch.from_numpy(x).to(device)).flatten(1)
    return F.normalize(t, dim=1)


@torch.no_grad()
def knn_topk(bank: RowSource, bank_rows: np.ndarray, query: RowSource, query_rows: np.ndarray,
             standardize: nn.Module, *, num_classes: int, k: int = 20, temperature: float = 0.07,
             device: torch.device = torch.device("cpu"), query_block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Weighted cosine kNN: ``(labels, top-5 predicted classes)`` for ``query_rows``.

    Queries are processed ``query_block`` rows at a time; for each, the bank is
    streamed once and a running top-``k`` of similarities is kept per query row.
    """
    standardize = copy.deepcopy(standardize).to(device)
    bank_labels = torch.from_numpy(bank.labels).to(device)
    k = min(k, len(bank_rows))
    all_labels, all_preds = [], []
    for q_ids, q_x in query.blocks(query_rows):
        for lo in range(0, len(q_ids), query_block):
            q = _normalised(q_x[lo:lo + query_block], standardize, device)
            best_s = torch.full((len(q), 0), -2.0, device=device)
            best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
            for b_ids, b_x in bank.blocks(bank_rows):
                s = q @ _normalised(b_x, standardize, device).T
                cat_s = torch.cat([best_s, s], dim=1)
                cat_i = torch.cat([best_i, torch.from_numpy(b_ids).to(device).expand(len(q), -1)], dim=1)
                top = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
                best_s, best_i = top.values, cat_i.gather(1, top.indices)
            votes = torch.zeros(len(q), num_classes, device=device, dtype=torch.float64)
            votes.scatter_add_(1, bank_labels[best_i], torch.exp(best_s.double() / temperature))
            all_preds.append(votes.topk(min(TOPK, num_classes), dim=1).indices.cpu().numpy())
        all_labels.append(query.labels[q_ids])
    return np.concatenate(all_labels), np.concatenate(all_preds)


def _load(source: RowSource, rows: np.ndarray, standardize: nn.Module) -> np.ndarray:
    """Rows of ``source`` as one standardised, flattened float32 matrix."""
    parts = []
    standardize = copy.deepcopy(standardize).cpu()
    with torch.no_grad():
        for _, x in source.blocks(rows):
            parts.append(standardize(torch.from_numpy(x)).flatten(1).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _fit(model, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def _log_loss(model, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of a fitted sklearn classifier (classes never seen in training: probability ~0)."""
    proba = model.predict_proba(x)
    col = {c: i for i, c in enumerate(model.classes_)}
    p = np.array([proba[r, col[c]] if c in col else 0.0 for r, c in enumerate(y)])
    return float(-np.log(np.clip(p, 1e-15, None)).mean())


def _topk(model, x: np.ndarray) -> np.ndarray:
    """Top-5 class indices (labels, not column indices) from a fitted sklearn classifier."""
    scores = model.decision_function(x)
    if scores.ndim == 1:  # binary: one column, positive means classes_[1]
        scores = np.stack([-scores, scores], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :TOPK]
    return model.classes_[order]


def logistic(train: RowSource, fit_rows: np.ndarray, val_rows: np.ndarray, std_fit: Standardize,
             std_all: Standardize, *, cs: tuple[float, ...], num_classes: int, refit: bool = True,
             max_iter: int = 1000) -> dict:
    """Choose C on validation, refit, and return the chosen model as a linear :class:`Probe`.

    Returns a dict with ``grid`` (one entry per C tried: ``{"hparams", "val_topk",
    "converged", "n_iter"}``), ``chosen`` (the best C's entry), ``probe`` (a
    ``Probe(standardize, LinearHead)`` that reproduces the final sklearn model on raw
    features), ``n_train`` and ``seconds``.
    """
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    x_fit, x_val = _load(train, fit_rows, std_fit), _load(train, val_rows, std_fit)
    y_fit, y_val = train.labels[fit_rows], train.labels[val_rows]
    grid: list[dict] = []
    model = LogisticRegression(C=cs[0], max_iter=max_iter, tol=1e-4, warm_start=True)

    def try_c(c: float) -> dict:
        model.set_params(C=c)
        _, converged = _fit(model, x_fit, y_fit)
        entry = {"hparams": {"C": float(c)}, "val_topk": _topk(model, x_val),
                 "val_loss": _log_loss(model, x_val, y_val), "converged": converged,
                 "n_iter": int(np.max(model.n_iter_))}
        grid.append(entry)
        logger.debug("logistic C=%.3g: val top-1 %.4f (%d iterations)", c,
                    float((entry["val_topk"][:, 0] == y_val).mean()), entry["n_iter"])
        return entry

    # Increasing C along a warm-started path: each fit starts from the more regularised solution.
    for c in sorted(cs):
        try_c(c)

    def score(e: dict) -> tuple[float, float]:
        # Top-1, ties to the lower validation cross-entropy (as for the trained heads).
        return float((e["val_topk"][:, 0] == y_val).mean()), -e["val_loss"]

    best = max(grid, key=score)  # max keeps the first (smallest C) among exact ties
    c0 = best["hparams"]["C"]
    for c in (c0 / np.sqrt(10.0), c0 * np.sqrt(10.0)):
        if all(not np.isclose(c, e["hparams"]["C"]) for e in grid):
            model = LogisticRegression(C=c0, max_iter=max_iter, tol=1e-4, warm_start=True)
            _fit(model, x_fit, y_fit)  # restart the path from the best C, then step to the neighbour
            try_c(float(c))
    best = max(sorted(grid, key=lambda e: e["hparams"]["C"]), key=score)
    # The final fit is cold and tight: a warm start with a loose tol can stop at 0 iterations
    # (probe_cka.md §4.2).
    if refit:
        x_all = _load(train, np.union1d(fit_rows, val_rows), std_all)
        y_all = train.labels[np.union1d(fit_rows, val_rows)]
        std_final = std_all
    else:
        x_all, y_all, std_final = x_fit, y_fit, std_fit
    final, converged = _fit(LogisticRegression(C=best["hparams"]["C"], max_iter=max_iter, tol=1e-5), x_all, y_all)
    probe = _as_probe(final, std_final, train.feature_shape, num_classes)
    return {"grid": grid, "chosen": best, "probe": probe, "converged": converged,
            "n_train": len(y_all), "seconds": time.perf_counter() - start}


def _as_probe(model, standardize: Standardize, feature_shape: tuple[int, ...], num_classes: int) -> Probe:
    """An sklearn multinomial model as ``Probe(standardize, LinearHead)`` over all ``num_classes``.

    Classes absent from training get a constant -inf-like logit so they are never predicted.
    """
    head = LinearHead(feature_shape, num_classes)
    coef, bias = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row, logit(classes_[1]) - logit(classes_[0])
        coef = np.concatenate([-coef / 2, coef / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    w = torch.zeros(num_classes, coef.shape[1])
    b = torch.full((num_classes,), -1e4)
    idx = torch.from_numpy(model.classes_.astype(np.int64))
    w[idx] = torch.from_numpy(coef.astype(np.float32))
    b[idx] = torch.from_numpy(bias.astype(np.float32))
    with torch.no_grad():
        head.fc.weight.copy_(w)
        head.fc.bias.copy_(b)
    return Probe(standardize, head).eval()
