"""Choosing a route and block sizes from the problem's shape and a memory budget.

The planner estimates each exact route's time as FLOPs at a nominal BLAS rate plus
bytes read at a nominal decode rate, keeps the routes whose working set fits the
budget, and takes the cheapest (probe_cka.md §3.4: feature space when D ≪ N, Gram
once per setting otherwise; the crossover moves with the number of settings L,
because the feature route pays per pair and the Gram route per setting).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from diffeat.errors import DiffeatError
from diffeat.runtime.checks import check_choice
from diffeat.runtime.memory import fmt_bytes

logger = logging.getLogger(__name__)

ROUTES = ("auto", "features", "gram", "minibatch")
PRECISIONS = ("float64", "float32")

# Nominal rates for the cost model only (2-core CPU: ~45 GFLOP/s float64, ~90 float32;
# zarr fp16 decode ~0.5 GB/s per process). Ratios matter, not absolute values.
FLOPS = {"float64": 45e9, "float32": 90e9}
READ_BYTES_PER_S = 0.5e9

def pair_groups(pairs: Sequence[tuple[int, int]], dims: Sequence[int], budget: int) -> list[list[tuple[int, int]]]:
    """Split pairs into groups whose Dᵢ×Dⱼ float64 accumulators fit ``budget`` bytes (each group: one pass)."""
    groups: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    used = 0
    for i, j in pairs:
        size = dims[i] * dims[j] * 8
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append((i, j))
        used += size
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class Plan:
    """What the planner decided, recorded with every result."""

    route: str
    in_memory: bool
    rows: int  # row block for streaming reads (feature route, moments, gathers)
    tile: int  # Gram tile rows (gram route)
    acc_budget: int  # bytes for the feature route's D×D accumulators (more pairs: more passes)
    cache_bytes: int  # bytes the gram route may keep centered row blocks in
    partition_rows: int  # rows gathered at once by the minibatch route
    budget: int
    reason: str
    estimates: dict

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)


def _round_rows(rows: int, chunk: int, n: int) -> int:
    """Clamp a block size to [1, n] and round it to whole stored chunks when that is affordable."""
    rows = max(1, min(int(rows), n))
    if chunk > 1 and rows >= chunk:
        rows = rows // chunk * chunk
    return rows


def make_plan(*, n: int, dims: Sequence[int], itemsize: int, chunk_rows: int, mask: np.ndarray, kernel: str,
              route: str, precision: str, budget: int, batch: int, block_rows: int | None = None,
              streamed: bool = False) -> Plan:
    """Pick the route (``route="auto"``) and block sizes for ``len(dims)`` settings of ``n`` rows.

    ``block_rows`` forces the row block and Gram tile size (tuning, tests); by default they
    are chosen from the budget and rounded to whole stored chunks. ``streamed``: never load
    the data (a dask cluster's workers read the blocks from the store).
    """
    if block_rows is not None and block_rows < 1:
        raise DiffeatError(f"--block-rows must be at least 1, got {block_rows}")
    check_choice(route, ROUTES, "--route")
    check_choice(precision, PRECISIONS, "--precision")
    count = len(dims)
    dims_a = np.asarray(dims, dtype=np.float64)
    data_bytes = float(dims_a.sum()) * n * itemsize
    in_memory = data_bytes <= 0.5 * budget and not streamed
    rest = budget - (data_bytes if in_memory else 0.0)
    cbytes = 8  # centered blocks are float64 before any cast
    pairs = [(i, j) for i in range(count) for j in range(i, count) if mask[i, j]]

    if kernel == "rbf":
        if route not in ("auto", "gram"):
            raise DiffeatError(f"RBF CKA needs n×n Gram matrices: --route {route} is for the linear kernel only")
        return Plan("rbf", False, block_rows or _round_rows(4096, chunk_rows, n), 0, 0, 0, 0, budget,
                    "RBF kernel: Gram matrices in memory", {})

    # Feature route: accumulators of the largest pair must fit, with room for the row blocks.
    acc_total = sum(dims[i] * dims[j] * 8 for i, j in pairs)
    acc_max = max(dims[i] * dims[j] * 8 for i, j in pairs)
    rows_f = _round_rows(max(256, min(8192, 0.25 * rest / max(1.0, dims_a.sum() * (itemsize + 2 * cbytes)))),
                         chunk_rows, n) if block_rows is None else min(block_rows, n)
    block_f = rows_f * float(dims_a.sum()) * (itemsize + 2 * cbytes)
    acc_budget = max(acc_max, int(rest - block_f))
    feasible_f = acc_max + block_f <= rest
    passes_f = len(pair_groups(pairs, dims, acc_budget))
    flops_f = sum(2.0 * n * dims[i] * dims[j] for i, j in pairs)
    read_f = data_bytes * (1 if in_memory else 1 + passes_f)
    time_f = flops_f / FLOPS[precision] + read_f / READ_BYTES_PER_S

    # Gram route: tile stack (L × t² float64) plus two row blocks of every setting, centered.
    per_row = float(dims_a.sum()) * (itemsize + cbytes) * (1 if in_memory else 2)
    tile = 1024
    while tile > 64 and count * tile * tile * 8 * 1.5 + 2 * tile * per_row > rest:
        tile //= 2
    tile = _round_rows(tile, chunk_rows if not in_memory else 1, n) if block_rows is None else min(block_rows, n)
    tile_bytes = count * tile * tile * 8 * 1.5 + 2 * tile * per_row
    feasible_g = tile_bytes <= rest
    cache_bytes = int(max(0.0, 0.8 * (rest - tile_bytes)))
    blocks_g = -(-n // tile)
    flops_g = float(dims_a.sum()) * n * n * (1 + 1 / blocks_g) + count * count * n * n
    read_g = data_bytes * (1 if in_memory else 1 + (blocks_g + 1) / 2)
    time_g = flops_g / FLOPS[precision] + read_g / READ_BYTES_PER_S

    estimates = {"features_s": round(time_f, 2), "gram_s": round(time_g, 2), "feature_passes": passes_f,
                 "data_bytes": int(data_bytes)}
    rows = rows_f
    if route == "auto":
        # The Gram route never holds an n×n matrix, but its cost grows as n²: auto only takes it
        # while one n×n float64 matrix would fit the budget; beyond that N is "too large for any
        # n×n matrix" and, when the feature route cannot run either, minibatch is the answer.
        feasible_g = feasible_g and n * n * 8 <= budget
        if feasible_f and (time_f <= time_g or not feasible_g):
            route, reason = "features", f"feature space: est. {time_f:.1f}s vs Gram {time_g:.1f}s"
        elif feasible_g:
            route, reason = "gram", f"Gram once per setting: est. {time_g:.1f}s vs features {time_f:.1f}s"
        else:
            route, reason = "minibatch", "no exact route fits the budget (n×n or D×D too large): minibatch"
            logger.warning("CKA: no exact route fits in %s (n=%d); using the minibatch estimator "
                           "(--route gram forces the exact n² computation)", fmt_bytes(budget), n)
    else:
        reason = f"--route {route}"
        if route == "features" and not feasible_f:
            raise DiffeatError(f"--route features needs {fmt_bytes(acc_max + block_f)} (one pair's D×D accumulator "
                               f"and a row block), over the {fmt_bytes(budget)} budget: raise --memory-budget or use "
                               "--route gram")
        if route == "gram" and not feasible_g:
            raise DiffeatError(f"--route gram does not fit the {fmt_bytes(budget)} budget with {tile}-row tiles: "
                               "raise --memory-budget or use --route minibatch")
    partition_rows = 0
    if route == "minibatch":
        if batch < 4:
            raise DiffeatError(f"--batch-size must be at least 4 for minibatch CKA, got {batch}")
        per_batch = count * batch * batch * 8 * 2 + batch * float(dims_a.sum()) * cbytes
        partition_rows = int(max(batch, (0.5 * budget - per_batch) // max(1.0, float(dims_a.sum()) * itemsize)))
    logger.debug("CKA plan: %s (%s); features %s", route, reason, "in memory" if in_memory else "streamed")
    estimate = {"features": time_f, "gram": time_g}.get(route, 0.0)
    if estimate > 3600:
        logger.warning("exact CKA is estimated at %.1f h on this machine; --route minibatch is much cheaper",
                       estimate / 3600)
    estimates["accumulator_bytes"] = int(acc_total)
    return Plan(route, in_memory, rows, tile, acc_budget, cache_bytes, partition_rows, budget, reason, estimates)


