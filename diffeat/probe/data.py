"""Feeding cached features to heads: validation split, standardisation statistics, row sources.

Two row sources share one interface (:class:`RowSource`):

* :class:`InMemoryRows` holds a whole split in RAM (or on the GPU) in the store's
  dtype and casts each batch to float32;
* :class:`StreamedRows` reads contiguous, chunk-aligned row blocks from zarr (in a
  seeded random block order, one block read ahead in a thread) through a shuffle
  buffer; it never reads single rows at random.

Which one a split gets is decided by its size against a memory budget
(:func:`fits`). Both are deterministic for a given generator; their batch orders
differ (the streamed one shuffles blocks, then rows within the buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffeat.errors import DiffeatError
from diffeat.probe.config import STANDARDIZE_MODES
from diffeat.runtime.checks import check_choice
from diffeat.store.fastread import read_rows
from diffeat.store.streaming import (
    BlockRing,
    RunningMoments,
    aligned_rows,
    block_ranges,
    buffer_for,
    prefetch,
)

if TYPE_CHECKING:
    import zarr

    from diffeat.store.reader import FeatureSet

logger = logging.getLogger(__name__)

def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices into ``(fit, val)``, both sorted.

    Each class gives ``round(fraction * n_c)`` rows to validation, at least one when
    it has two or more rows and none when it has a single row (so every class seen
    in training stays in the fit part).
    """
    if not 0.0 < fraction < 1.0:
        raise DiffeatError(f"--val-fraction must be in (0, 1), not {fraction}")
    rng = np.random.default_rng([seed, 0x5A1])
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_val = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        val.append(rng.permutation(rows)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    fit_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    if len(val_idx) == 0:
        raise DiffeatError("the validation split is empty: every class has a single training row "
                           "(give --val-split NAME, or more training data)")
    return fit_idx.astype(np.int64), val_idx.astype(np.int64)


def standardizer(moments: RunningMoments, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, inv_std)`` float32 tensors for :class:`diffeat.heads.Standardize` from per-feature moments.

    ``mode``: ``"feature"`` (every (c, y, x) on its own), ``"channel"`` (one pair per
    channel of a ``C×k×k`` map), ``"none"`` (identity). Constant features get
    ``inv_std = 0`` so they contribute nothing instead of noise.
    """
    check_choice(mode, STANDARDIZE_MODES, "--standardize")
    if moments.count == 0:
        raise DiffeatError("no training rows to compute standardisation statistics on")
    mean, var = moments.mean, moments.m2 / moments.count
    if mode == "none":
        return torch.zeros(1), torch.ones(1)
    if mode == "channel" and mean.ndim == 3:
        # Equal counts at every position: pool the per-position moments per channel.
        mean_c = mean.mean(axis=(1, 2), keepdims=True)
        var = (var + (mean - mean_c) ** 2).mean(axis=(1, 2), keepdims=True)
        mean = mean_c
    inv = np.where(var > 1e-20, 1.0 / np.sqrt(np.maximum(var, 1e-300)), 0.0)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(inv.astype(np.float32))


def mean_sq_norm(moments: RunningMoments, mean: torch.Tensor, inv_std: torch.Tensor) -> float:
    """``E‖(x - mean) · inv_std‖²`` over the rows ``moments`` summarise (≈ D when standardised)."""
    m = mean.double().numpy()
    inv = inv_std.double().numpy()
    var = moments.m2 / max(1, moments.count)
    per = (var + (moments.mean - m) ** 2) * inv**2
    return float(np.broadcast_to(per, moments.mean.shape).sum())


class RowSource:
    """Rows of one split, read in batches. ``labels`` are int64, aligned with the rows."""

    labels: np.ndarray
    feature_shape: tuple[int, ...]
    in_memory: bool

    def __len__(self) -> int:
        return len(self.labels)

    def blocks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_ids, float32 features)`` for the sorted ``rows``, in row order, block by block.

        A block may be overwritten once the next one is requested (a streamed source decodes into
        reused buffers): a consumer copies what it keeps; it may change a block in place.
        """
        raise TypeError(f"{type(self).__name__} must define blocks()")

    def batches(self, rows: np.ndarray, batch_size: int, device: torch.device,
                rng: np.random.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32, y int64)`` tensors on ``device``; shuffled when ``rng`` is given."""
        raise TypeError(f"{type(self).__name__} must define batches()")


class InMemoryRows(RowSource):
    """A whole split held as one tensor (store dtype) on CPU or on the training device."""

    def __init__(self, data: np.ndarray, labels: np.ndarray, device: torch.device):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.feature_shape = tuple(data.shape[1:])
        self.in_memory = True
        self.data = torch.from_numpy(np.ascontiguousarray(data)).to(device)
        self._labels_t = torch.from_numpy(self.labels).to(device)

    def blocks(self, rows: np.ndarray, block_rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for lo in range(0, len(rows), block_rows):
            r = rows[lo:lo + block_rows]
            yield r, self.data[torch.from_numpy(r).to(self.data.device)].float().cpu().numpy()

    def batches(self, rows, batch_size, device, rng=None):
        order = rng.permutation(rows) if rng is not None else rows
        idx_all = torch.from_numpy(np.ascontiguousarray(order)).to(self.data.device)
        for lo in range(0, len(order), batch_size):
            idx = idx_all[lo:lo + batch_size]
            x = self.data[idx].to(device, non_blocking=True).float()
            yield x, self._labels_t[idx].to(device, non_blocking=True)


class StreamedRows(RowSource):
    """A split read from zarr in contiguous chunk-aligned blocks, shuffled through a buffer.

    Args:
        array: the ``(N, ...)`` zarr array.
        labels: int64 labels of the N rows.
        chunk_rows: rows per stored chunk (or shard); blocks are multiples of it.
        block_rows: target rows per read (rounded up to whole chunks).
        buffer_rows: rows held in the shuffle buffer; a batch mixes rows of every
            block currently in the buffer. Larger is closer to a full shuffle.
    """

    def __init__(self, array: zarr.Array, labels: np.ndarray, chunk_rows: int, block_rows: int = 4096,
                 buffer_rows: int = 65536, read: Callable[..., np.ndarray] | None = None):
        self.array = array
        self.read = read  # FeatureSet.read: checked reads (damaged chunks, lost rows) of a store setting
        self.labels = np.asarray(labels, dtype=np.int64)
        self.feature_shape = tuple(array.shape[1:])
        self.in_memory = False
        self.ranges = block_ranges(int(array.shape[0]), chunk_rows, block_rows)
        self.buffer_rows = max(buffer_rows, aligned_rows(block_rows, chunk_rows))

    def _read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        if self.read is not None:
            return self.read(lo, hi, np.float32, out=out)
        return read_rows(self.array, lo, hi, np.float32, out=out)

    def _selected(self, rows: np.ndarray, order: list[int], reuse: bool = False
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Read the blocks in ``order`` (one read ahead in a thread) and keep the rows in ``rows``.

        ``reuse``: decode into a :class:`BlockRing` (a block may be overwritten once the next one
        is requested), for consumers that are done with a block when they ask for the next.
        """
        wanted = [(lo, hi) for lo, hi in (self.ranges[i] for i in order)
                  if np.searchsorted(rows, lo) < np.searchsorted(rows, hi)]
        depth = 1
        ring = BlockRing.for_blocks(wanted, depth, self.feature_shape, np.float32) if reuse else None
        blocks = ((lo, hi, self._read(lo, hi, buffer_for(ring, lo, hi))) for lo, hi in wanted)
        for lo, hi, block in prefetch(blocks, depth=depth, name="diffeat-probe-read"):
            r = rows[np.searchsorted(rows, lo):np.searchsorted(rows, hi)]
            yield r, block if len(r) == hi - lo else block[r - lo]  # every row wanted: no copy

    def blocks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # Every consumer of blocks() is done with a block when it asks for the next (statistics,
        # L-BFGS passes, kNN, evaluation), so blocks are decoded into reused buffers: reading a pass
        # costs about 30% less CPU than into new arrays (docs/performance.md). The shuffled batches
        # hold blocks: no reuse there.
        yield from self._selected(rows, list(range(len(self.ranges))), reuse=True)

    def batches(self, rows, batch_size, device, rng=None):
        if rng is None:
            for r, x in self.blocks(rows):
                for lo in range(0, len(r), batch_size):
                    yield (torch.from_numpy(x[lo:lo + batch_size]).to(device),
                           torch.from_numpy(self.labels[r[lo:lo + batch_size]]).to(device))
            return
        order = [int(i) for i in rng.permutation(len(self.ranges))]
        buf_x: list[np.ndarray] = []
        buf_r: list[np.ndarray] = []
        held = 0
        for r, x in self._selected(rows, order):
            buf_x.append(x)
            buf_r.append(r)
            held += len(r)
            if held >= self.buffer_rows:
                xs, rs = np.concatenate(buf_x), np.concatenate(buf_r)
                perm = rng.permutation(len(rs))
                n_out = len(rs) // batch_size * batch_size  # the remainder stays to mix with the next blocks
                for lo in range(0, n_out, batch_size):
                    sel = perm[lo:lo + batch_size]
                    yield torch.from_numpy(xs[sel]).to(device), torch.from_numpy(self.labels[rs[sel]]).to(device)
                keep = perm[n_out:]
                buf_x, buf_r, held = [xs[keep]], [rs[keep]], len(keep)
        if held:
            xs, rs = np.concatenate(buf_x), np.concatenate(buf_r)
            perm = rng.permutation(len(rs))
            for lo in range(0, len(rs), batch_size):
                sel = perm[lo:lo + batch_size]
                yield torch.from_numpy(xs[sel]).to(device), torch.from_numpy(self.labels[rs[sel]]).to(device)


def fits(nbytes: int, budget: int) -> bool:
    """Whether a split of ``nbytes`` (store dtype) is loaded whole rather than streamed."""
    return nbytes <= budget


def make_source(features: FeatureSet, budget: int, device: torch.device, *, block_rows: int = 4096,
                buffer_rows: int | None = None) -> RowSource:
    """A row source for a ``FeatureSet``: in memory if it fits ``budget`` bytes, else streamed.

    In memory, the rows go to ``device`` when it is a GPU with room for them (else they stay
    in host RAM and batches are copied). Streamed, the shuffle buffer gets at most a quarter
    of the budget (as float32).
    """
    nbytes = int(features.nbytes)
    if fits(nbytes, budget):
        where = torch.device("cpu")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            where = device if nbytes * 1.25 < free else where
        logger.debug("loading %s (%s, %.1f MiB) into %s", features.info.path, features.info.split,
                    nbytes / 2**20, where)
        return InMemoryRows(features.read(0, len(features), None), features.labels, where)
    row_bytes = 4 * int(np.prod(features.array.shape[1:]))
    if buffer_rows is None:
        buffer_rows = max(block_rows, budget // 4 // max(1, row_bytes))
    logger.info("streaming %s (%s, %.1f MiB > budget %.1f MiB), shuffle buffer %d rows", features.info.path,
                features.info.split, nbytes / 2**20, budget / 2**20, buffer_rows)
    return StreamedRows(features.array, features.labels, features.chunk_rows, block_rows, buffer_rows,
                        read=features.read)


def moments(source: RowSource, fit_rows: np.ndarray, val_rows: np.ndarray | None = None
            ) -> tuple[RunningMoments, RunningMoments]:
    """Per-feature float64 moments of the fit rows and of the validation rows, in one streaming pass.

    Kept apart so that hyperparameter search standardises with fit-row statistics only
    and a refit on fit + validation rows uses their merge.
    """
    val_rows = np.zeros(0, np.int64) if val_rows is None else val_rows
    fit_acc = RunningMoments.empty(source.feature_shape)
    val_acc = RunningMoments.empty(source.feature_shape)
    for r, x in source.blocks(np.union1d(fit_rows, val_rows)):
        in_val = np.isin(r, val_rows, assume_unique=True)
        fit_acc.add(x[~in_val])
        val_acc.add(x[in_val])
    return fit_acc, val_acc
