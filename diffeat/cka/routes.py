"""The four ways to fill an HSIC matrix over L settings, all streaming over row blocks.

Each route returns ``h`` (L, L), float64, symmetric, NaN where a pair was not asked
for; :func:`diffeat.cka.estimators.cka_from_hsic` turns it into CKA. Features are
centered with float64 means before any product; every accumulator is float64.

* ``features``: per pair, ``Xᵢᵀ Xⱼ`` accumulated over row blocks (plus the row-norm
  terms of the unbiased estimator). Cost Σ_pairs 2N·Dᵢ·Dⱼ, memory Σ_pairs Dᵢ·Dⱼ.
* ``gram``: the n×n Grams are never stored; they are produced tile by tile (upper
  triangle only), U-/double-centered and all L tiles are multiplied together, so each
  setting's Gram is computed once and reused for all pairs. Cost Σᵢ N²·Dᵢ + L²N².
* ``minibatch``: Nguyen et al. (2021): HSIC summed over uniformly random batches.
* ``rbf``: Gram matrices held in memory (an RBF Gram has no feature-space shortcut).

The exact linear routes are sums over row ranges (:func:`feature_stats`) or runs of Gram
tiles (:func:`gram_row_block`); :mod:`diffeat.cka.cluster` runs those as dask tasks.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.linalg.blas import dgemm, dsyrk

from diffeat.cka.estimators import (
    center_gram,
    feature_hsic,
    gram_rbf,
    hsic_scale,
    u_center_tile,
)
from diffeat.cka.plan import pair_groups
from diffeat.cka.sources import ArraySource, LoadedSource, gather_rows, iter_rows
from diffeat.errors import DiffeatError
from diffeat.runtime.memory import fmt_bytes
from diffeat.store.streaming import RunningMoments

logger = logging.getLogger(__name__)


def _center(block: np.ndarray, m: RunningMoments, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(centered block in ``dtype``, float64 row squared norms of the centered rows)."""
    xc = np.asarray(block, dtype=np.float64) - m.mean
    s = np.einsum("ij,ij->i", xc, xc)
    return (xc if dtype == np.float64 else xc.astype(dtype)), s


def _accumulate(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``acc += aᵀ b`` with a float64 accumulator (Fortran order), without a temporary in float64."""
    if a.dtype == np.float64:
        # aᵀ and bᵀ of C-ordered blocks are Fortran-ordered: BLAS reads them without copies.
        dgemm(1.0, a.T, b.T, beta=1.0, c=acc, trans_b=1, overwrite_c=1)
    else:
        acc += a.T @ b  # float32 products of centered blocks; the sum over blocks stays float64


def add_products(acc: np.ndarray, stack: np.ndarray, weight: float = 1.0) -> None:
    """``acc += weight · stack stackᵀ`` for a short, very wide float64 ``stack`` (L × t²).

    BLAS syrk on ``stack.T`` (Fortran-ordered, so no copy): for L=37, t=1024 it took 0.09 s,
    against 1.4 s for ``stack @ stack.T`` and 1.9 s for ``np.dot`` (numpy's generic paths
    handle a 37 × 10⁶ operand badly).
    """
    upper = dsyrk(weight, stack.T, trans=1)  # only the upper triangle is filled
    acc += np.triu(upper) + np.triu(upper, 1).T


def feature_stats(sources: Sequence[ArraySource] | Mapping[int, ArraySource], moments: Sequence[RunningMoments],
                  group: Sequence[tuple[int, int]], rows: int, dtype: np.dtype, lo: int = 0, hi: int | None = None
                  ) -> tuple[dict[tuple[int, int], np.ndarray], np.ndarray]:
    """Row-additive statistics of the feature route over rows ``[lo, hi)``, in float64.

    Returns ``{(i, j): Σ Xᵢᵀ Xⱼ}`` for the pairs of ``group`` (centered features) and
    ``Σ sᵀs`` (row squared norms) over the settings involved, in sorted index order. Sums
    over disjoint row ranges add up (the dask cluster route reduces them on the client).
    """
    involved = sorted({i for p in group for i in p})
    pos = {i: k for k, i in enumerate(involved)}
    accs = {p: np.zeros((sources[p[0]].dim, sources[p[1]].dim), order="F") for p in group}
    s_dot = np.zeros((len(involved), len(involved)))
    for _, blocks in iter_rows([sources[i] for i in involved], rows, lo, hi):
        centered = [_center(b, moments[i], dtype) for i, b in zip(involved, blocks)]
        s = np.stack([c[1] for c in centered], axis=1)
        s_dot += s.T @ s
        for i, j in group:
            _accumulate(accs[(i, j)], centered[pos[i]][0], centered[pos[j]][0])
    return accs, s_dot


def features_route(sources: Sequence[ArraySource], moments: Sequence[RunningMoments], mask: np.ndarray, estimator: str,
                   dtype: np.dtype, acc_budget: int, rows: int,
                   group_stats: Callable[[list[tuple[int, int]]], tuple[dict, np.ndarray]] | None = None
                   ) -> np.ndarray:
    """HSIC for the pairs in ``mask`` from feature-space statistics (see estimators' docstring).

    ``group_stats(group)`` computes :func:`feature_stats` over all rows for a group of pairs
    (default: in this process, streaming row blocks of ``rows``).
    """
    n = moments[0].n
    dims = [s.dim for s in sources]
    count = len(sources)
    pairs = [(i, j) for i in range(count) for j in range(i, count) if mask[i, j]]
    groups = pair_groups(pairs, dims, acc_budget)
    if len(groups) > 1:
        logger.info("feature route: %d pairs in %d passes (accumulators over the memory budget)", len(pairs),
                    len(groups))
    h = np.full((count, count), np.nan)
    for group in groups:
        involved = sorted({i for p in group for i in p})
        pos = {i: k for k, i in enumerate(involved)}
        if group_stats is None:
            accs, s_dot = feature_stats(sources, moments, group, rows, dtype)
        else:
            accs, s_dot = group_stats(group)
        for (i, j), acc in accs.items():
            cross_sq = float(np.einsum("ij,ij->", acc, acc))
            h[i, j] = h[j, i] = feature_hsic(cross_sq, s_dot[pos[i], pos[j]], moments[i].total, moments[j].total, n,
                                             estimator)
    return h


def gram_route(sources: Sequence[ArraySource], moments: Sequence[RunningMoments], estimator: str, dtype: np.dtype,
               tile: int, cache_bytes: int = 0) -> np.ndarray:
    """HSIC for all pairs from Gram tiles: each setting's Gram computed once (upper triangle), never stored.

    Centered row blocks are kept (up to ``cache_bytes``) for the tiles that need them again,
    instead of being re-read and re-centered.
    """
    n = moments[0].n
    count = len(sources)
    totals = [m.total for m in moments]
    acc = np.zeros((count, count))
    cache: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
    cached = 0

    def prepare(lo: int, blocks: list[np.ndarray] | None) -> tuple[list[np.ndarray], np.ndarray]:
        nonlocal cached
        if lo in cache:
            return cache[lo]
        if blocks is None:
            blocks = [s.read(lo, min(n, lo + tile)) for s in sources]
        centered = [_center(b, m, dtype) for b, m in zip(blocks, moments)]
        out = [c[0] for c in centered], np.stack([c[1] for c in centered], axis=1)
        size = sum(x.nbytes for x in out[0])
        if cached + size <= cache_bytes:
            cache[lo] = out
            cached += size
        return out

    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        rows_x, rows_s = prepare(r0, None)
        # Tiles right of the diagonal: from the cache, else read ahead in a thread.
        uncached = next((lo for lo in range(r1, n, tile) if lo not in cache), n)
        later = itertools.chain(((lo, None) for lo in range(r1, uncached, tile)),
                                iter_rows(sources, tile, lo=uncached) if uncached < n else ())
        for c0, blocks in itertools.chain([(r0, None)], later):
            same = c0 == r0
            cols_x, cols_s = (rows_x, rows_s) if same else prepare(c0, blocks)
            add_gram_tile(acc, rows_x, rows_s, cols_x, cols_s, totals, n, estimator, dtype, same)
    return acc * hsic_scale(n, estimator)


def add_gram_tile(acc: np.ndarray, rows_x: Sequence[np.ndarray], rows_s: np.ndarray, cols_x: Sequence[np.ndarray],
                  cols_s: np.ndarray, totals: Sequence[float], n: int, estimator: str, dtype: np.dtype,
                  same: bool) -> None:
    """``acc += w · stack stackᵀ`` for one Gram tile position of every setting (unscaled HSIC terms).

    ``rows_x``/``cols_x``: each setting's centered row blocks; ``rows_s``/``cols_s``: their row
    squared norms (rows × settings); ``same``: the tile is on the diagonal (w = 1, else 2: a
    tile off the diagonal stands for itself and its mirror image).
    """
    count = len(rows_x)
    m_rows, m_cols = len(rows_s), len(cols_s)
    stack = np.empty((count, m_rows * m_cols))
    for i in range(count):
        g = stack[i].reshape(m_rows, m_cols)
        if dtype == np.float64:
            np.matmul(rows_x[i], cols_x[i].T, out=g)
        else:
            g[...] = rows_x[i] @ cols_x[i].T
        if estimator == "unbiased":
            u_center_tile(g, rows_s[:, i], cols_s[:, i], totals[i], n, diagonal=same)
        # biased: the Gram of centered features is already double-centered
    add_products(acc, stack, 1.0 if same else 2.0)


def gram_row_block(sources: Sequence[ArraySource], moments: Sequence[RunningMoments], r0: int, tile: int, estimator: str,
                   dtype: np.dtype, c_lo: int | None = None, c_hi: int | None = None) -> np.ndarray:
    """Unscaled HSIC terms (L × L) of the Gram tiles ``(r0, c0)`` for ``c0`` in ``[c_lo, c_hi)``.

    ``c_lo`` (default ``r0``) and ``c_hi`` (default n) are multiples of ``tile`` with
    ``c_lo ≥ r0``: a run of the upper triangle's row ``r0``. Summed over every tile of the upper
    triangle and scaled by :func:`hsic_scale`, they give what :func:`gram_route` returns (the
    dask cluster route runs one run per task).
    """
    n = moments[0].n
    c_lo = r0 if c_lo is None else c_lo
    c_hi = n if c_hi is None else min(n, c_hi)
    totals = [m.total for m in moments]
    acc = np.zeros((len(sources), len(sources)))

    def center(blocks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        centered = [_center(b, m, dtype) for b, m in zip(blocks, moments)]
        return [c[0] for c in centered], np.stack([c[1] for c in centered], axis=1)

    rows_x, rows_s = center([s.read(r0, min(n, r0 + tile)) for s in sources])
    if c_lo == r0:
        add_gram_tile(acc, rows_x, rows_s, rows_x, rows_s, totals, n, estimator, dtype, True)
        c_lo += tile
    if c_lo < c_hi:
        for _, blocks in iter_rows(sources, tile, lo=c_lo, hi=c_hi):
            cols_x, cols_s = center(blocks)
            add_gram_tile(acc, rows_x, rows_s, cols_x, cols_s, totals, n, estimator, dtype, False)
    return acc


def minibatch_route(sources: Sequence[ArraySource], estimator: str, batch: int, passes: int, seed: int,
                    partition_rows: int, rows: int) -> np.ndarray:
    """Minibatch CKA statistics (Nguyen et al. 2021): Σ over random batches of per-batch HSIC.

    Batches are uniformly random: each pass draws a permutation; when the data do not fit
    in memory, the permutation is cut into partitions of ``partition_rows`` rows, each
    gathered by one streaming read, so every batch is still a uniform random subset (a
    class-sorted sample table would bias contiguous batches). Each batch is centered by its
    own mean (HSIC does not depend on centering) and batches of fewer than 4 rows are skipped.
    """
    n = sources[0].n
    count = len(sources)
    rng = np.random.default_rng(seed)
    acc = np.zeros((count, count))
    in_memory = all(isinstance(s, LoadedSource) for s in sources)
    partition_rows = max(batch, partition_rows // batch * batch)
    used = skipped = 0
    for _ in range(passes):
        perm = rng.permutation(n)
        for p0 in range(0, n, partition_rows):
            members = perm[p0:p0 + partition_rows]
            if in_memory:
                data, where = [s.array for s in sources], members
            else:
                order = np.argsort(members)
                data = gather_rows(sources, members[order], rows)
                where = np.empty_like(order)
                where[order] = np.arange(len(order))
            for b0 in range(0, len(where), batch):
                sel = np.sort(where[b0:b0 + batch])  # sorted: faster gathers, same subset
                m = len(sel)
                if m < (4 if estimator == "unbiased" else 2):
                    skipped += m
                    continue
                stack = np.empty((count, m * m))
                for i in range(count):
                    xb = np.asarray(data[i][sel], dtype=np.float64)
                    xb -= xb.mean(axis=0)
                    g = stack[i].reshape(m, m)
                    np.matmul(xb, xb.T, out=g)
                    if estimator == "unbiased":
                        s = np.diagonal(g).copy()
                        u_center_tile(g, s, s, float(s.sum()), m, diagonal=True)
                add_products(acc, stack, hsic_scale(m, estimator))
                used += 1
    if skipped:
        logger.info("minibatch CKA: %d rows in too-small final batches skipped", skipped)
    logger.info("minibatch CKA: %d batches of %d (%d passes)", used, batch, passes)
    return acc


def rbf_route(sources: Sequence[ArraySource], mask: np.ndarray, estimator: str, threshold: float,
              budget: int) -> np.ndarray:
    """HSIC of RBF Grams, holding as many centered n×n Grams as ``budget`` allows.

    Settings are processed in tiles of ``cap`` Grams; Grams of later tiles are rebuilt once
    per earlier tile (cheap compared to running out of memory).
    """
    n = sources[0].n
    count = len(sources)
    per_gram = n * n * 8
    # Building one Gram needs ~2 more n×n temporaries (distances, the median's partition copy).
    cap = budget // per_gram - 2
    if cap < min(2, count):
        raise DiffeatError(
            f"RBF CKA at n={n} needs {fmt_bytes(4 * per_gram)} or more (n×n float64 matrices) but the memory "
            f"budget is {fmt_bytes(budget)}: raise --memory, or use --subsample to compare fewer samples"
        )

    def build(i: int) -> np.ndarray:
        k = gram_rbf(sources[i].read(0, n), threshold)
        return center_gram(k, estimator, inplace=True)

    def inner(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.einsum("ij,ij->", a, b)) * hsic_scale(n, estimator)

    h = np.full((count, count), np.nan)
    width = count if cap >= count else max(1, cap - 1)
    for a0 in range(0, count, width):
        tile = list(range(a0, min(count, a0 + width)))
        grams = {i: build(i) for i in tile}
        for x, i in enumerate(tile):
            for j in tile[x:]:
                if mask[i, j]:
                    h[i, j] = h[j, i] = inner(grams[i], grams[j])
        for j in range(tile[-1] + 1, count):
            if any(mask[i, j] for i in tile):
                gj = build(j)
                for i in tile:
                    if mask[i, j]:
                        h[i, j] = h[j, i] = inner(grams[i], gj)
                del gj
        del grams
    return h
