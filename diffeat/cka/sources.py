"""Where CKA reads features from: row ranges of (N, D) matrices, in memory or streamed from zarr.

A *source* is one feature setting seen as an (N, D) matrix, ``D = C·k·k``. Every route
reads contiguous row ranges (``read(lo, hi)``), so a source can be a NumPy array, a
zarr array, or a store's :class:`~diffeat.store.FeatureSet`; nothing is loaded whole
unless the planner decided it fits in the memory budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from diffeat.errors import DiffeatError, StoreError
from diffeat.store.fastread import read_rows
from diffeat.store.streaming import (
    BlockRing,
    RunningMoments,
    block_ranges,
    buffer_for,
    merge_all,
    prefetch,
)

logger = logging.getLogger(__name__)


class ArraySource:
    """An (N, ...) array-like (NumPy, zarr, anything sliceable along rows) viewed as (N, D).

    ``ids`` (optional) are the sample ids of the rows; sources are only compared when
    their ids agree. Reads return float32 (float64 when the array is float64).
    """

    def __init__(self, array: Any, *, label: str = "x", ids: Sequence[str] | np.ndarray | None = None,
                 chunk_rows: int | None = None, meta: dict | None = None):
        shape = tuple(int(v) for v in array.shape)
        if len(shape) < 2:
            raise DiffeatError(f"features {label!r} must be (N, D) or (N, C, k, k), got shape {shape}")
        self.array = array
        self.label = label
        self.n = shape[0]
        self.dim = int(np.prod(shape[1:]))
        self.shape = shape
        self.ids = None if ids is None else np.asarray(ids).astype(str)
        if self.ids is not None and len(self.ids) != self.n:
            raise DiffeatError(f"features {label!r} have {self.n} rows but {len(self.ids)} sample ids")
        chunks = getattr(array, "shards", None) or getattr(array, "chunks", None)
        self.chunk_rows = int(chunk_rows or (chunks[0] if chunks else 1))
        self.dtype = np.dtype(np.float64 if np.dtype(array.dtype) == np.float64 else np.float32)
        self.meta = meta or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, n={self.n}, dim={self.dim})"

    @property
    def nbytes(self) -> int:
        """Bytes of the whole matrix as read (float32/float64)."""
        return self.n * self.dim * self.dtype.itemsize

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` as a C-contiguous (hi-lo, D) float array (decoded into ``out`` when given).

        A zarr array is read by the store's fast path (``diffeat.store.fastread``), anything
        else by slicing it.
        """
        rows = None if out is None else out.reshape((hi - lo,) + self.shape[1:])
        return read_rows(self.array, lo, hi, self.dtype, out=rows).reshape(hi - lo, self.dim)

    def block_ranges(self, rows: int) -> list[tuple[int, int]]:
        """``(lo, hi)`` of contiguous row blocks of about ``rows`` rows, rounded up to whole stored chunks.

        Blocks smaller than a chunk (a memory budget too small for one) are not rounded up: the
        budget holds, at the price of decoding a chunk once per block that touches it.
        """
        if rows < self.chunk_rows:
            return [(lo, min(self.n, lo + rows)) for lo in range(0, self.n, max(1, rows))]
        return block_ranges(self.n, self.chunk_rows, rows)

    def iter_blocks(self, rows: int, *, reuse: bool = False, depth: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, block)`` over :meth:`block_ranges`.

        ``reuse``: decoded into a :meth:`ring` for a read-ahead ``depth`` deep (a block is valid
        until the next one is requested).
        """
        ranges = self.block_ranges(rows)
        ring = self.ring(ranges, depth) if reuse else None
        for lo, hi in ranges:
            yield lo, self.read(lo, hi, out=buffer_for(ring, lo, hi))

    def ring(self, ranges: Sequence[tuple[int, int]], depth: int = 1) -> BlockRing | None:
        """Reusable buffers for decoding the row ``ranges`` read ahead ``depth`` deep (:class:`BlockRing`).

        None for an array that is not a zarr array: an in-memory array's rows are a view (or
        one cast), and copying them into a buffer would add work instead of saving it.
        """
        if not hasattr(self.array, "metadata"):
            return None
        return BlockRing.for_blocks(ranges, depth, (self.dim,), self.dtype)


class FeatureSetSource(ArraySource):
    """A store setting (:class:`diffeat.store.FeatureSet`) as a source; streams through its own reader."""

    def __init__(self, features: Any):
        info = features.info
        meta = {"label": info.label(), "path": info.path, "model": info.model, "block": info.block, "t": info.t,
                "pool": info.pool, "name": info.name, "shape": list(info.shape), "dtype": info.dtype,
                "settings_hash": info.settings_hash}
        # Aligned to the inner chunks of a sharded array (256 KiB): a shard (64 MiB) is read in parts,
        # so row blocks need not be whole shards, which a small memory budget could not hold.
        super().__init__(features.array, label=info.label(), ids=features.ids,
                         chunk_rows=int(features.array.chunks[0]), meta=meta)
        self.features = features

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` through the store's reader, as a C-contiguous (hi-lo, D) float array."""
        rows = None if out is None else out.reshape((hi - lo,) + self.shape[1:])
        return self.features.read(lo, hi, self.dtype, out=rows).reshape(hi - lo, self.dim)


class KeptRows(ArraySource):
    """A source seen through a subset of its rows, in order (rows of undecodable images left out).

    A read of ``[lo, hi)`` reads the contiguous stretch of the source that holds those kept
    rows (they are nearly contiguous: only a few rows are ever skipped) and drops the others.
    """

    def __init__(self, source: ArraySource, kept: np.ndarray):
        self.origin = source
        self.kept = np.asarray(kept, dtype=np.int64)
        self.array = source.array
        self.label = source.label
        self.n = len(self.kept)
        self.dim = source.dim
        self.shape = (self.n, *source.shape[1:])
        self.ids = None if source.ids is None else source.ids[self.kept]
        self.chunk_rows = source.chunk_rows
        self.dtype = source.dtype
        self.meta = source.meta

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Kept rows ``[lo, hi)`` as a C-contiguous (hi-lo, D) float array (copied into ``out`` when given)."""
        rows = self.kept[lo:hi]
        if not len(rows):
            return np.empty((0, self.dim), dtype=self.dtype) if out is None else out
        first = int(rows[0])
        if int(rows[-1]) + 1 - first == len(rows):  # no row left out in this range: read straight into out
            return self.origin.read(first, first + len(rows), out=out)
        block = self.origin.read(first, int(rows[-1]) + 1)
        if out is None:
            return np.ascontiguousarray(block[rows - first])
        np.take(block, rows - first, axis=0, out=out.reshape(len(rows), self.dim))
        return out


def leave_out_skipped(sources: Sequence[ArraySource]) -> list[ArraySource]:
    """The sources without the rows any store setting among them skipped (images that could not be decoded).

    Every source loses the same rows, so they stay aligned; a warning counts them.
    """
    skipped = [s.features.skipped for s in sources if isinstance(s, FeatureSetSource)]
    drop = np.unique(np.concatenate(skipped)) if skipped else np.zeros(0, np.int64)
    if not len(drop):
        return list(sources)
    logger.warning("CKA: leaving out %d rows whose images could not be decoded at extraction (ids: %s%s)",
                   len(drop), ", ".join(map(str, sources[0].ids[drop[:5]])) if sources[0].ids is not None else "",
                   " ..." if len(drop) > 5 else "")
    out: list[ArraySource] = []
    wrapped: dict[int, ArraySource] = {}
    for s in sources:  # one wrapper per source object, so a setting on both axes stays one setting
        if id(s) not in wrapped:
            wrapped[id(s)] = KeptRows(s, np.setdiff1d(np.arange(s.n, dtype=np.int64), drop))
        out.append(wrapped[id(s)])
    return out


class LoadedSource(ArraySource):
    """A source held in memory (what the planner makes of a source that fits the budget)."""

    def __init__(self, source: ArraySource, data: np.ndarray):
        # chunk_rows=1: in-memory blocks may be any size (moments then work in bounded float64 copies).
        super().__init__(data, label=source.label, ids=source.ids, chunk_rows=1, meta=source.meta)
        self.origin = source

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """A view of rows ``[lo, hi)`` (no copy; copied into ``out`` when given)."""
        if out is None:
            return self.array[lo:hi]
        out[...] = self.array[lo:hi]
        return out


def as_source(obj: Any, label: str) -> ArraySource:
    """Wrap an array, a zarr array or a ``FeatureSet`` as a source (sources pass through)."""
    if isinstance(obj, ArraySource):
        return obj
    from diffeat.store.reader import (
        FeatureSet,  # zarr is only imported when a store is used
    )

    if isinstance(obj, FeatureSet):
        return FeatureSetSource(obj)
    if not hasattr(obj, "shape"):
        obj = np.asarray(obj)
    return ArraySource(obj, label=label)


def check_aligned(sources: Sequence[ArraySource]) -> int:
    """Check that all sources describe the same samples in the same order; return N.

    Sources with sample ids must have identical ids in identical order (comparing
    features of different images is meaningless, and silently realigning out-of-core
    data would mean random reads); sources without ids must at least agree on N.
    """
    if not sources:
        raise DiffeatError("CKA needs at least one feature setting")
    ref = sources[0]
    for src in sources[1:]:
        if src.n != ref.n:
            raise StoreError(f"sample mismatch: {ref.label!r} has {ref.n} rows, {src.label!r} has {src.n}")
    with_ids = [s for s in sources if s.ids is not None]
    for src in with_ids[1:]:
        a, b = with_ids[0], src
        if np.array_equal(a.ids, b.ids):
            continue
        if len(set(a.ids)) == len(a.ids) and set(a.ids) == set(b.ids):
            first = int(np.flatnonzero(a.ids != b.ids)[0])
            raise StoreError(
                f"sample order mismatch between {a.label!r} and {b.label!r}: same ids, different order "
                f"(row {first}: {a.ids[first]!r} vs {b.ids[first]!r}); re-import one of them with --ids to "
                "put it in the store's sample-table order"
            )
        only_a = sorted(set(a.ids) - set(b.ids))[:3]
        only_b = sorted(set(b.ids) - set(a.ids))[:3]
        raise StoreError(
            f"sample id mismatch between {a.label!r} and {b.label!r}: ids only in the first {only_a}, "
            f"only in the second {only_b} (are they from the same dataset split?)"
        )
    return ref.n


def iter_rows(sources: Sequence[ArraySource], rows: int, lo: int = 0, hi: int | None = None,
              depth: int = 1) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Common row blocks ``(start, [block of each source])`` over ``[lo, hi)``, read ahead in a thread.

    Blocks of zarr arrays are decoded into reused buffers (:class:`BlockRing`): a block is valid
    until the next one is requested. Every caller centres or gathers a block into a new array at once.
    """
    hi = sources[0].n if hi is None else hi
    ranges = [(a, min(hi, a + rows)) for a in range(lo, hi, rows)]
    rings = [s.ring(ranges, depth) for s in sources]
    blocks = ((a, [s.read(a, b, out=buffer_for(ring, a, b)) for s, ring in zip(sources, rings)]) for a, b in ranges)
    return prefetch(blocks, depth=depth)


def gather_rows(sources: Sequence[ArraySource], index: np.ndarray, rows: int) -> list[np.ndarray]:
    """Rows ``index`` (sorted, unique) of each source, read by streaming contiguous blocks."""
    out = [np.empty((len(index), s.dim), dtype=s.dtype) for s in sources]
    if isinstance(sources[0], LoadedSource) and all(isinstance(s, LoadedSource) for s in sources):
        return [np.ascontiguousarray(s.array[index]) for s in sources]
    pos = 0
    for start, blocks in iter_rows(sources, rows):
        stop = start + len(blocks[0])
        take = index[pos:np.searchsorted(index, stop)]
        if len(take):
            for o, b in zip(out, blocks):
                o[pos:pos + len(take)] = b[take - start]
            pos += len(take)
    return out


def moments(source: ArraySource, rows: int) -> RunningMoments:
    """One streaming pass: column means and centred sums of squares, merged per block (Chan et al.)."""
    blocks = prefetch(source.iter_blocks(rows, reuse=True))  # RunningMoments.of keeps nothing of a block
    return merge_all((RunningMoments.of(block) for _, block in blocks), (source.dim,))


def load(source: ArraySource, rows: int) -> LoadedSource:
    """Read a source whole into memory (streamed block by block; the destination is preallocated)."""
    if isinstance(source, LoadedSource):
        return source
    data = np.empty((source.n, source.dim), dtype=source.dtype)
    for lo, hi in source.block_ranges(rows):  # decoded in place: no block is held twice
        source.read(lo, hi, out=data[lo:hi])
    return LoadedSource(source, data)
