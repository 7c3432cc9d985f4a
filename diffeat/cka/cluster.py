"""CKA's exact linear routes on a dask.distributed cluster (``diffeat cka --scheduler/--workers``).

What runs where:

* **workers** open each setting's zarr array themselves, read-only, from the store's location
  (path or URL), storage options and array path (an :class:`ArrayRef`): no feature data is
  shipped from the client. Each task streams a contiguous, chunk-aligned range of row blocks,
  one block (plus one read ahead) in memory at a time, and returns float64 partial sums:
  per-block moments; the feature route's ``Σ Xᵢᵀ Xⱼ`` and ``Σ sᵀs`` over its rows; the Gram
  route's ``L × L`` products of one row of tiles.
* **the client** merges the partial moments in row order (Chan's formula over the same blocks
  as the single-process streaming pass, so means and totals are bitwise the same), adds the
  partial sums in task order (deterministic for a given cluster size) and finishes the
  HSIC/CKA. It holds only the D×D (feature route) or L×L (Gram route) accumulators and one
  partial result at a time.

The results equal the single-process routes up to float64 summation order (≤ 1e-12). With
``precision="float32"`` the row-block products are float32 matrix products, which BLAS does not
promise to round alike in two processes (its small-matrix kernels depend on the operands' memory
alignment): there the routes agree to float32 rounding (measured 8e-10; the float32 route itself is
within 5e-8 of float64, probe_cka.md §4.1), not bitwise. The
minibatch and RBF routes, and data held in memory (NumPy arrays, ``--subsample``), run in the
calling process (:func:`cluster_refs` logs why).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from diffeat.cka.routes import feature_stats, features_route, gram_row_block
from diffeat.cka.sources import ArraySource, KeptRows, LoadedSource
from diffeat.errors import DiffeatError
from diffeat.store.refs import ArrayRef, open_array, read_on_worker, ref_of
from diffeat.store.streaming import RunningMoments, buffer_for, merge_all, prefetch

logger = logging.getLogger(__name__)

TASKS_PER_THREAD = 4  # row ranges per worker thread: load balance against per-task partial results
WAIT_FOR_WORKERS = 60  # seconds to wait for a first worker of a scheduler that has none


def array_ref(source: ArraySource) -> ArrayRef | None:
    """Where a worker opens a source's array itself; None for data held in memory."""
    if isinstance(source, (LoadedSource, KeptRows)):  # in memory, or some rows left out: computed here
        return None
    features = getattr(source, "features", None)
    if features is not None:  # a store setting: the store's own location and options
        return features.ref()
    return ref_of(source.array, label=source.label, chunk_rows=source.chunk_rows)


def cluster_refs(client: Any, sources: Sequence[ArraySource], kernel: str, route: str) -> list[ArrayRef] | None:
    """Refs of every source when the cluster can compute this CKA, else None (with a log line why)."""
    if client is None:
        return None
    if kernel != "linear" or route == "minibatch":
        what = "RBF CKA" if kernel != "linear" else "the minibatch route"
        logger.warning("%s runs in this process: only the exact linear routes (features, gram) use the "
                       "dask cluster", what)
        return None
    refs = [array_ref(s) for s in sources]
    missing = [s.label for s, r in zip(sources, refs) if r is None]
    if missing:
        logger.warning("CKA runs in this process: %s %s in memory, not in a zarr store the dask workers can open "
                       "(or has rows left out)",
                       ", ".join(missing[:3]) + ("..." if len(missing) > 3 else ""),
                       "is" if len(missing) == 1 else "are")
        return None
    if not client.nthreads():
        logger.info("waiting up to %d s for a dask worker to join", WAIT_FOR_WORKERS)
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS)
        except TimeoutError:
            raise DiffeatError(f"the dask scheduler has no workers (waited {WAIT_FOR_WORKERS} s): start some with "
                               "`dask worker ADDRESS`") from None
    return refs


# ---------------------------------------------------------------------------------------------
# Worker side: open arrays from their refs (cached per process), compute partial statistics.

class WorkerSource(ArraySource):
    """A source opened from its ref in a worker: reads refuse rows that no stored chunk holds."""

    def __init__(self, ref: ArrayRef):
        super().__init__(open_array(ref), label=ref.label, chunk_rows=ref.chunk_rows)
        self.ref = ref

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` as a C-contiguous (hi-lo, D) float array (``store.refs.read_on_worker``)."""
        rows = None if out is None else out.reshape((hi - lo,) + self.shape[1:])
        return read_on_worker(self.array, self.ref, lo, hi, self.dtype, out=rows).reshape(hi - lo, self.dim)


def open_ref(ref: ArrayRef) -> ArraySource:
    """The ref's array opened read-only in this (worker) process (cached per process), as a source."""
    return WorkerSource(ref)


def moments_task(ref: ArrayRef, ranges: Sequence[tuple[int, int]]) -> list[RunningMoments]:
    """The moments of each row block ``ranges`` (merged by the client in row order)."""
    source = open_ref(ref)
    ring = source.ring(ranges)  # RunningMoments.of keeps nothing of a block
    blocks = (source.read(lo, hi, out=buffer_for(ring, lo, hi)) for lo, hi in ranges)
    return [RunningMoments.of(block) for block in prefetch(blocks)]


def features_task(refs: dict[int, ArrayRef], moments: dict[int, RunningMoments], group: list[tuple[int, int]],
                  rows: int, dtype: np.dtype, lo: int, hi: int) -> tuple[dict, np.ndarray]:
    """The feature route's partial sums (:func:`~diffeat.cka.routes.feature_stats`) over rows ``[lo, hi)``."""
    sources = {i: open_ref(ref) for i, ref in refs.items()}
    return feature_stats(sources, moments, group, rows, np.dtype(dtype), lo, hi)


def gram_task(refs: list[ArrayRef], moments: list[RunningMoments], r0: int, c_lo: int, c_hi: int, tile: int,
              estimator: str, dtype: np.dtype) -> np.ndarray:
    """A run of Gram tiles of one row (:func:`~diffeat.cka.routes.gram_row_block`)."""
    return gram_row_block([open_ref(r) for r in refs], moments, r0, tile, estimator, np.dtype(dtype), c_lo, c_hi)


# ---------------------------------------------------------------------------------------------
# Client side


def _threads(client: Any) -> int:
    return max(1, sum(client.nthreads().values()))


def _spans(ranges: Sequence[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Cut consecutive ``ranges`` into at most ``parts`` contiguous runs of about equal length."""
    per = max(1, math.ceil(len(ranges) / max(1, parts)))
    return [list(ranges[k:k + per]) for k in range(0, len(ranges), per)]


def _results(client: Any, calls: Iterable[tuple[Callable, tuple]], window: int) -> Iterator[Any]:
    """Submit ``calls`` with at most ``window`` outstanding; yield their results in submission order.

    In-order results keep the reduction deterministic; the window bounds the partial results
    waiting in worker memory. Futures are released once read, and cancelled on an error.
    """
    from distributed import KilledWorker

    calls = iter(calls)
    pending: deque = deque()
    count = 0

    def submit() -> bool:
        nonlocal count
        call = next(calls, None)
        if call is None:
            return False
        fn, args = call
        pending.append(client.submit(fn, *args, pure=False, priority=-count))
        count += 1
        return True

    try:
        while len(pending) < window and submit():
            pass
        while pending:
            future = pending.popleft()
            try:
                result = future.result()
            except KilledWorker as e:
                raise DiffeatError(f"a dask worker died while computing CKA ({e}); out of memory? Give the "
                                   "workers more memory, or lower --memory (smaller blocks, fewer pairs per "
                                   "pass)") from None
            future.release()
            submit()
            yield result
    finally:
        if pending:
            client.cancel(list(pending))


def cluster_moments(client: Any, refs: Sequence[ArrayRef], sources: Sequence[ArraySource], rows: int
                    ) -> list[RunningMoments]:
    """Every setting's means and centered total on the cluster (bitwise those of the streamed pass)."""
    parts = max(1, TASKS_PER_THREAD * _threads(client) // max(1, len(refs)))
    calls, owner = [], []
    for k, (ref, source) in enumerate(zip(refs, sources)):
        for span in _spans(source.block_ranges(rows), parts):
            calls.append((moments_task, (ref, span)))
            owner.append(k)
    blocks: list[list] = [[] for _ in refs]
    for k, result in zip(owner, _results(client, calls, window=len(calls))):
        blocks[k].extend(result)
    return [merge_all(b, (s.dim,)) for b, s in zip(blocks, sources)]


def _row_ranges(n: int, rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` or fewer contiguous row ranges, each a whole number of ``rows`` blocks."""
    blocks = math.ceil(n / rows)
    per = max(1, math.ceil(blocks / max(1, parts)))
    return [(lo, min(n, lo + per * rows)) for lo in range(0, n, per * rows)]


def cluster_features_route(client: Any, refs: Sequence[ArrayRef], sources: Sequence[ArraySource],
                           moments: Sequence[RunningMoments], mask: np.ndarray, estimator: str, dtype: np.dtype,
                           acc_budget: int, rows: int) -> np.ndarray:
    """:func:`~diffeat.cka.routes.features_route` with the row-block sums computed on the cluster."""
    from diffeat.runtime.cluster import describe

    info = describe(client)
    threads = max(1, info["threads"])
    if info["memory_limit"]:
        # Each task holds its group's partial sums, and a finished one may wait for the client.
        acc_budget = max(1, min(acc_budget, info["memory_limit"] // 4))
    n = moments[0].n
    ranges = _row_ranges(n, rows, TASKS_PER_THREAD * threads)
    logger.info("CKA features route on dask (%s, %d threads): %d tasks of up to %d rows", info["scheduler"],
                threads, len(ranges), ranges[0][1] - ranges[0][0])

    def group_stats(group: list[tuple[int, int]]) -> tuple[dict, np.ndarray]:
        involved = sorted({i for p in group for i in p})
        g_refs = {i: refs[i] for i in involved}
        [g_moments] = client.scatter([{i: moments[i] for i in involved}], broadcast=True, hash=False)
        accs: dict | None = None
        s_dot = None
        calls = ((features_task, (g_refs, g_moments, group, rows, dtype, lo, hi)) for lo, hi in ranges)
        try:
            for part_accs, part_s in _results(client, calls, window=2 * threads):
                if accs is None:
                    accs, s_dot = part_accs, part_s
                    continue
                for p, a in part_accs.items():
                    accs[p] += a
                s_dot += part_s
        finally:
            g_moments.release()
        return accs, s_dot

    return features_route(sources, moments, mask, estimator, dtype, acc_budget, rows, group_stats=group_stats)


def cluster_gram_route(client: Any, refs: Sequence[ArrayRef], moments: Sequence[RunningMoments], estimator: str,
                       dtype: np.dtype, tile: int) -> np.ndarray:
    """:func:`~diffeat.cka.routes.gram_route` with one row of Gram tiles per cluster task."""
    from diffeat.cka.estimators import hsic_scale

    n = moments[0].n
    count = len(refs)
    starts = list(range(0, n, tile))
    # Runs of about equal numbers of tiles, TASKS_PER_THREAD per thread; each task reads its row
    # block once and streams its column blocks.
    tiles = len(starts) * (len(starts) + 1) // 2
    per = max(1, math.ceil(tiles / (TASKS_PER_THREAD * _threads(client))))
    runs = [(r0, c, min(n, c + per * tile)) for r0 in starts for c in range(r0, n, per * tile)]
    logger.info("CKA Gram route on dask: %d tiles of %d rows in %d tasks", tiles, tile, len(runs))
    [shared] = client.scatter([list(moments)], broadcast=True, hash=False)
    acc = np.zeros((count, count))
    try:
        calls = ((gram_task, (list(refs), shared, r0, c_lo, c_hi, tile, estimator, dtype)) for r0, c_lo, c_hi in runs)
        for part in _results(client, calls, window=len(runs)):
            acc += part
    finally:
        shared.release()
    return acc * hsic_scale(n, estimator)
