"""Worker-side array references: where a dask worker opens a setting's array itself, read-only.

A cluster task carries an :class:`ArrayRef` (a few strings and ints), never feature data:
the worker opens the zarr array from the store's location, caches it per process, and
checks that it has the shape the client saw; :func:`read_on_worker` refuses rows that no
stored chunk holds, as the client's ``FeatureSet.read`` does. Used by CKA's and the probe's
cluster passes.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from diffeat.errors import StoreError
from diffeat.store.fastread import read_rows, rows_of

if TYPE_CHECKING:
    import zarr


@dataclass(frozen=True)
class ArrayRef:
    """Where a worker opens one setting's array, read-only, and what it must find there."""

    location: str  # absolute path or fsspec URL of the zarr store
    path: str  # array path inside the store ("" when the store is the array)
    storage_options: dict | None
    shape: tuple[int, ...]
    chunk_rows: int
    label: str

    @property
    def n(self) -> int:
        """Rows of the array."""
        return self.shape[0]


def store_location(array: Any) -> tuple[str, dict | None] | None:
    """``(location, storage_options)`` of the store a zarr array lives in; None for in-memory stores."""
    store = getattr(array, "store", None)
    if store is None or not hasattr(array, "path"):
        return None
    from zarr.storage import FsspecStore, LocalStore

    if isinstance(store, LocalStore):
        return str(store.root), None
    if isinstance(store, FsspecStore) and store.fs.protocol not in ("memory", ("memory",)):
        return store.fs.unstrip_protocol(store.path), dict(store.fs.storage_options) or None
    return None


def ref_of(array: Any, *, label: str, chunk_rows: int) -> ArrayRef | None:
    """The :class:`ArrayRef` of a zarr array in a local or remote store; None when workers cannot open it."""
    where = store_location(array)
    if where is None:
        return None
    return ArrayRef(where[0], str(array.path or ""), where[1], tuple(int(v) for v in array.shape), int(chunk_rows),
                    label)


_OPEN: dict[tuple, Any] = {}
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 256  # arrays kept open per worker process


def open_array(ref: ArrayRef) -> zarr.Array:
    """The ref's array opened read-only in this (worker) process; cached, and re-opened if its shape changed."""
    key = (ref.location, json.dumps(ref.storage_options, sort_keys=True, default=str), ref.path)
    with _OPEN_LOCK:
        array = _OPEN.get(key)
    if array is None or tuple(array.shape) != ref.shape:  # a long-lived worker: the array may have been rewritten
        import zarr

        from diffeat.store.objects import make_zarr_store

        try:
            store = make_zarr_store(ref.location, read_only=True, storage_options=ref.storage_options)
            array = zarr.open_array(store=store, path=ref.path, mode="r")
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"dask worker on {socket.gethostname()} cannot open {ref.label!r} at "
                             f"{ref.location}/{ref.path}: {type(e).__name__}: {e} (the workers must see the store: "
                             "a shared filesystem path, or a URL with --storage-options)") from None
        if tuple(array.shape) != ref.shape:
            raise StoreError(f"dask worker on {socket.gethostname()}: {ref.location}/{ref.path} has shape "
                             f"{tuple(array.shape)}, the client saw {ref.shape} (did the store change?)")
        with _OPEN_LOCK:
            if len(_OPEN) >= _OPEN_MAX:
                _OPEN.clear()
            _OPEN[key] = array
    return array


def read_on_worker(array: zarr.Array, ref: ArrayRef, lo: int, hi: int, dtype: np.dtype | type,
                   out: np.ndarray | None = None, wanted: np.ndarray | None = None) -> np.ndarray:
    """Rows ``[lo, hi)`` of the ref's array in a worker; a wanted row that no stored chunk holds is a ``StoreError``.

    ``wanted``: offsets in the block of the rows the task uses (None: all). A lost chunk object
    reads as NaN, its fill value; without this check a cluster run would average NaN into its
    statistics, where a local run refuses the rows (``FeatureSet.read``). The reader reports the
    chunks it filled, so no values are scanned.
    """
    filled: list[tuple[int, int]] = []
    block = read_rows(array, lo, hi, dtype, out=out, nan_rows=filled)
    if filled:
        lost = rows_of(filled)
        if wanted is not None:
            lost = lost[np.isin(lost, lo + np.asarray(wanted, dtype=np.int64))]
        if len(lost):
            raise StoreError(f"dask worker on {socket.gethostname()}: rows {lost[:5].tolist()}"
                             f"{' ...' if len(lost) > 5 else ''} of {ref.label!r} are in no stored chunk (a chunk "
                             f"object was lost): run `diffeat verify --repair` on {ref.location}")
    return block
