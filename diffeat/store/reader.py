"""Open a feature store and read settings from it (never writes when opened read-only)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr

from diffeat.errors import StoreError
from diffeat.runtime.checks import check_choice
from diffeat.store.fastread import read_rows
from diffeat.store.layout import STORE_FORMAT, check_name, setting_label
from diffeat.store.location import absolute, is_url, local_path
from diffeat.store.refs import ArrayRef
from diffeat.store.streaming import aligned_rows, block_ranges
from diffeat.store.streaming import prefetch as read_ahead

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingInfo:
    """One feature array of the store, as listed by ``diffeat ls``."""

    model: str
    dataset: str
    split: str
    block: int | None
    t: int | None  # None: imported features, or a model without a timestep (a vision backbone)
    pool: int | None
    name: str | None  # imported external features only
    shape: tuple[int, ...]
    dtype: str
    status: str  # "complete" | "in_progress"
    path: str  # array path inside the store
    settings_hash: str = ""
    created: str = ""
    created_by: dict = field(default_factory=dict, compare=False)
    completed: str | None = None
    stored_bytes: int | None = None  # compressed bytes on the store (from the catalog)

    def label(self) -> str:
        """Short human label: ``b24/t90/p1``, ``b3/p1`` (no timestep), or the import name."""
        return setting_label(self.block, self.t, self.pool, self.name)

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _info_from_array(path: str, arr: zarr.Array) -> SettingInfo | None:
    meta = dict(arr.attrs).get("diffeat")
    if not isinstance(meta, dict) or "setting" not in meta:
        return None
    s = meta["setting"]
    return SettingInfo(
        model=s["model"], dataset=s["dataset"], split=s["split"], block=s.get("block"), t=s.get("t"),
        pool=s.get("pool"), name=s.get("name"), shape=tuple(arr.shape), dtype=str(arr.dtype),
        status=meta.get("status", "in_progress"), path=path, settings_hash=meta.get("settings_hash", ""),
        created=meta.get("created", ""), created_by=meta.get("created_by", {}),
    )


def _info_from_entry(e: dict) -> SettingInfo:
    s = e["setting"]
    return SettingInfo(
        model=s["model"], dataset=s["dataset"], split=s["split"], block=s.get("block"), t=s.get("t"),
        pool=s.get("pool"), name=s.get("name"), shape=tuple(e["shape"]), dtype=e["dtype"], status=e["status"],
        path=e["path"], settings_hash=e.get("settings_hash", ""), created=e.get("created", ""),
        created_by=e.get("created_by", {}), completed=e.get("completed"), stored_bytes=e.get("stored_bytes"),
    )


@dataclass
class FeatureSet:
    """One setting's features with its sample table: what probe and CKA read."""

    info: SettingInfo
    array: zarr.Array
    ids: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    attrs: dict
    location: str = ""  # the store's path or URL (for dask workers, which open the array themselves)
    storage_options: dict | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk (reads aligned to it touch each chunk once)."""
        shards = self.array.shards
        return int((shards or self.array.chunks)[0])

    @property
    def nbytes(self) -> int:
        """Uncompressed size in bytes."""
        return int(np.prod(self.array.shape)) * self.array.dtype.itemsize

    def block_ranges(self, rows: int = 4096) -> list[tuple[int, int]]:
        """``(lo, hi)`` of contiguous row blocks of about ``rows`` rows, each whole stored chunks."""
        return block_ranges(len(self), self.chunk_rows, rows)

    def read(self, lo: int, hi: int, dtype: np.dtype | type | None = np.float32, *, out: np.ndarray | None = None
             ) -> np.ndarray:
        """Rows ``[lo, hi)`` as ``dtype`` (None: the stored dtype), decoded into ``out`` when given.

        Read by the fast path (``diffeat.store.fastread``: whole chunks fetched and decoded
        concurrently, straight into the result, with zarr-python's values bitwise), or by
        zarr-python for a layout it does not know.
        """
        return read_rows(self.array, lo, hi, dtype, out=out)

    def load(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read every row into memory."""
        return self.read(0, len(self), dtype)

    def iter_blocks(self, rows: int = 4096, dtype: np.dtype | type = np.float32, *, prefetch: int = 1
                    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` over contiguous row blocks, aligned to whole chunks.

        ``rows`` is rounded up to a multiple of the chunk rows, so each stored chunk is
        decoded once; the next block is read in a thread while the caller uses this one
        (``prefetch`` blocks ahead; 0 reads in the caller's thread). Memory holds
        ``1 + prefetch`` blocks at a time (out-of-core).
        """
        blocks = ((lo, self.read(lo, hi, dtype)) for lo, hi in self.block_ranges(rows))
        yield from read_ahead(blocks, depth=prefetch)

    def to_dask(self, rows: int = 4096):
        """A dask array over the features, one dask chunk per ``rows`` rows (chunk-aligned)."""
        import dask.array as da

        return da.from_zarr(self.array, chunks=(aligned_rows(rows, self.chunk_rows),) + tuple(self.array.shape[1:]))

    def ref(self) -> ArrayRef:
        """Where a dask worker opens this setting's array itself (``diffeat.store.refs``)."""
        return ArrayRef(absolute(self.location), self.info.path, self.storage_options, tuple(self.array.shape),
                        self.chunk_rows, self.info.label())


class FeatureStore:
    """A feature store at a path or fsspec URL.

    ``mode="r"`` never writes (it works on read-only directories and read-only
    credentials); ``mode="a"`` creates the store if needed (used by extract).
    """

    def __init__(self, location: str | Path, *, mode: str = "r", storage_options: dict | None = None):
        self.location = str(location)
        self.mode = mode
        self.storage_options = storage_options
        read_only = mode == "r"
        if not read_only and not is_url(self.location):
            _check_local_writable(self.location)
        from diffeat.store.objects import make_zarr_store

        store = make_zarr_store(self.location, read_only=read_only, storage_options=storage_options)
        try:
            if read_only:
                self.root = zarr.open_group(store=store, mode="r")
            else:
                self.root = _open_or_create_root(store)
        except FileNotFoundError as e:
            why = self.objects.missing_reason() if is_url(self.location) else None
            if why is None:
                raise StoreError(f"no feature store at {self.location} (run `diffeat extract --store ...` first)") from e
            raise StoreError(f"no feature store at {self.location}: {why}; check the URL, or run "
                             "`diffeat extract --store ...` first") from e
        except PermissionError as e:
            if read_only:
                raise StoreError(f"feature store {self.location} cannot be read: {e}") from e
            raise StoreError(f"feature store {self.location} is not writable: {e}") from e
        fmt = dict(self.root.attrs).get("diffeat", {}).get("store_format")
        if fmt is None:
            raise StoreError(f"{self.location} is a Zarr group but not a diffeat feature store (no attrs.diffeat)")
        if fmt > STORE_FORMAT:
            raise StoreError(
                f"{self.location} has store format {fmt}; this diffeat reads format {STORE_FORMAT}: upgrade diffeat"
            )

    def __repr__(self) -> str:
        return f"FeatureStore({self.location!r}, mode={self.mode!r})"

    @functools.cached_property
    def objects(self):
        """The store's small coordination objects (claims, catalog): ``diffeat.store.objects.ObjectStore``."""
        from diffeat.store.objects import ObjectStore

        return ObjectStore(self.location, self.storage_options)

    def check_writable(self) -> None:
        """Raise a ``StoreError`` unless this store is open for writing and writes succeed."""
        if self.mode == "r":
            raise StoreError(f"store {self.location} is open read-only; extract needs mode 'a'")
        self.objects.check_writable()

    # -- listing ------------------------------------------------------------------------------
    def list_settings(self, *, walk: bool = False) -> list[SettingInfo]:
        """Every feature array in the store, sorted by model, dataset, split, block, t, pool.

        Read from the catalog (``_catalog/``: one listing) when the store has one;
        ``walk=True``, or a store without a catalog, walks the Zarr hierarchy instead.
        """
        from diffeat.store.catalog import read_catalog

        # Only a store whose root says so has an entry for every setting: one made before the
        # catalog existed is walked until `diffeat verify --repair` fills its catalog in.
        complete = dict(self.root.attrs).get("diffeat", {}).get("catalog")
        entries = read_catalog(self.objects) if complete and not walk else None
        out = [_info_from_entry(e) for e in entries] if entries is not None else self._walk()
        key = lambda s: (s.model, s.dataset, s.split, s.name or "", s.block or 0, s.t or 0, s.pool or 0)  # noqa: E731
        return sorted(out, key=key)

    def _walk(self) -> list[SettingInfo]:
        if "features" not in self.root:
            return []
        out = []
        for path, node in self.root["features"].members(max_depth=None):
            if isinstance(node, zarr.Array) and path.endswith("data"):
                # The array's own metadata, not a group's consolidated copy of it (which can lag).
                node = zarr.open_array(store=self.root.store, path=f"features/{path}", mode="r")
                info = _info_from_array(f"features/{path}", node)
                if info is not None:
                    out.append(info)
        return out

    def find(self, *, dataset: str, split: str, block: int | None = None, t: int | None = None,
             pool: int | None = None, model: str | None = None, name: str | None = None) -> SettingInfo:
        """The one setting that matches, or a ``StoreError`` saying what exists."""
        of_dataset = [s for s in self.list_settings() if s.dataset == dataset]
        candidates = [s for s in of_dataset if s.split == split]
        wanted = {"model": model, "block": block, "t": t, "pool": pool, "name": name}
        matches = [s for s in candidates if all(v is None or getattr(s, k) == v for k, v in wanted.items())]
        if name is None:
            matches = [s for s in matches if s.name is None]
        if len(matches) == 1:
            return matches[0]
        asked = ", ".join(f"{k}={v}" for k, v in {"dataset": dataset, "split": split, **wanted}.items() if v is not None)
        have = sorted({f"{s.model}:{s.label()}" for s in candidates})
        if not matches:
            other = sorted({s.split for s in of_dataset})
            held = f" (features of {dataset} are stored for split(s) {', '.join(other)})" if not have and other else ""
            raise StoreError(
                f"no features for {asked} in {self.location}; for {dataset}/{split} it holds: "
                f"{', '.join(have) if have else 'nothing'}{held}"
            )
        raise StoreError(
            f"{len(matches)} feature arrays match {asked} in {self.location}: "
            + "; ".join(f"{s.path} shape={s.shape}" for s in matches)
            + " (name the model with --model)"
        )

    def splits(self, dataset: str) -> list[str]:
        """The splits of ``dataset`` this store holds a sample table for (features of them or not)."""
        base = f"datasets/{check_name(dataset, 'dataset')}"
        if base not in self.root:
            return []
        return sorted(name for name, _ in self.root[base].groups())

    def standard_pair(self, dataset: str) -> tuple[str, str]:
        """(train, test) splits of ``dataset`` among those stored (``diffeat.data.standard_pair``'s rule)."""
        from diffeat.data.registry import standard_pair

        return standard_pair(dataset, self.splits(dataset), self.location)

    def test_split(self, dataset: str) -> str:
        """The split to compare features on: the standard pair's test split, or the only split stored."""
        held = self.splits(dataset)
        if len(held) == 1:
            return held[0]
        return self.standard_pair(dataset)[1]

    # -- reading ------------------------------------------------------------------------------
    def sample_rows(self, dataset: str, split: str) -> dict[str, np.ndarray]:
        """The stored sample table of a split, row by row in feature-row order: id, path, label, class_name."""
        ids, labels, names = self.sample_table(dataset, split)
        base = f"datasets/{check_name(dataset, 'dataset')}/{check_name(split, 'split')}"
        group = self.root[base][sorted(k for k, _ in self.root[base].groups())[0]]
        paths = np.array(group["path"][:].tolist(), dtype=str) if "path" in group else np.full(len(ids), "")
        return {"id": ids, "path": paths, "label": labels, "class_name": np.array(names, dtype=str)[labels]}

    def sample_table(self, dataset: str, split: str, manifest_sha256: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(ids, labels, class_names)`` of a dataset split stored in this store."""
        base = f"datasets/{check_name(dataset, 'dataset')}/{check_name(split, 'split')}"
        if base not in self.root:
            raise StoreError(f"no sample table for {dataset}/{split} in {self.location}")
        group = self.root[base]
        keys = sorted(k for k, _ in group.groups())
        if manifest_sha256 is not None:
            keys = [k for k in keys if manifest_sha256.startswith(k)]
        if len(keys) != 1:
            raise StoreError(
                f"{len(keys)} sample tables for {dataset}/{split} in {self.location}"
                + ("" if keys else f" matching manifest {manifest_sha256}")
            )
        table = group[keys[0]]
        ids = np.array(table["id"][:].tolist(), dtype=str)
        labels = np.asarray(table["label"][:], dtype=np.int64)
        names = [str(c) for c in table["class_name"][:]]
        return ids, labels, names

    def open_features(self, *, dataset: str, split: str, block: int | None = None, t: int | None = None,
                      pool: int | None = None, model: str | None = None, name: str | None = None,
                      require_complete: bool = True) -> FeatureSet:
        """Open one setting with its sample table (see ``find`` for matching)."""
        info = self.find(dataset=dataset, split=split, block=block, t=t, pool=pool, model=model, name=name)
        array = zarr.open_array(store=self.root.store, path=info.path, mode="r")
        meta = dict(array.attrs)["diffeat"]
        info = dataclasses.replace(info, status=meta.get("status", "in_progress"))  # the array is the truth
        if require_complete and info.status != "complete":
            raise StoreError(
                f"features {info.path} are not complete (status {info.status!r}): finish them with "
                "`diffeat extract` (it resumes) before reading"
            )
        ids, labels, classes = self.sample_table(dataset, split, meta.get("manifest_sha256"))
        if len(ids) != array.shape[0]:
            raise StoreError(f"{info.path} has {array.shape[0]} rows but its sample table has {len(ids)}")
        return FeatureSet(info, array, ids, labels, classes, meta, self.location, self.storage_options)


def _open_or_create_root(store) -> zarr.Group:
    """Open the root group for writing, creating it if needed; safe when writers race to create it."""
    from zarr.errors import ContainsGroupError

    try:
        root = zarr.open_group(store=store, mode="a")
    except ContainsGroupError:  # another writer created it between our check and our create
        root = zarr.open_group(store=store, mode="r+")
    if "diffeat" not in root.attrs:
        # Identical bytes from every writer that gets here, so a race only writes the same thing twice.
        # "catalog": every setting of this store has a catalog entry (it was made with the catalog).
        root.attrs["diffeat"] = {"store_format": STORE_FORMAT, "catalog": 1}
    return root


def _check_local_writable(location: str) -> None:
    existing = local_path(location)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise StoreError(
            f"feature store {location} is read-only ({existing} is not writable): "
            "extract needs write access; probe, cka and ls work read-only"
        )


def open_store(location: str | Path, *, mode: str = "r", storage_options: dict | None = None) -> FeatureStore:
    """Open the feature store at a path or fsspec URL (``mode="r"``: read-only)."""
    check_choice(mode, ("r", "a"), "store mode", error=StoreError)
    return FeatureStore(location, mode=mode, storage_options=storage_options)


def as_store(store: str | Path | FeatureStore, *, mode: str = "r", storage_options: dict | None = None
             ) -> FeatureStore:
    """An open ``FeatureStore``: ``store`` itself when it is one, else the store at that path or URL.

    The one way extract (``mode="a"``), probe and CKA (``mode="r"``) take their ``store`` argument.
    An open store must be writable when ``mode="a"`` is asked for.
    """
    if isinstance(store, FeatureStore):
        if mode == "a" and store.mode == "r":
            raise StoreError(f"store {store.location} is open read-only; this needs it opened with mode 'a'")
        return store
    if not str(store).strip():
        raise StoreError("--store is empty: give a path or fsspec URL for the feature store")
    return open_store(store, mode=mode, storage_options=storage_options)


def store_option(options: dict) -> tuple[dict, FeatureStore | None]:
    """Split a stage's keyword arguments for its options record: an open ``FeatureStore`` given as
    ``store=`` becomes its location (and storage options) in the record, and is returned beside it."""
    store = options.get("store")
    if not isinstance(store, FeatureStore):
        return options, None
    return {**options, "store": store.location, "storage_options": store.storage_options}, store


def open_features(store: str | Path | FeatureStore, **keywords) -> FeatureSet:
    """Open one setting of a store (path, URL or open ``FeatureStore``) read-only."""
    return as_store(store).open_features(**keywords)
