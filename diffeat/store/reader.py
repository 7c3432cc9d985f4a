"""Open a feature store and read settings from it (never writes when opened read-only)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr

from diffeat.errors import StoreError, first_line
from diffeat.runtime.checks import check_choice
from diffeat.store.fastread import read_rows, rows_of
from diffeat.store.layout import STORE_FORMAT, check_name, model_store_name, setting_label
from diffeat.store.location import absolute, check_location, is_url, local_path
from diffeat.store.refs import ArrayRef
from diffeat.store.streaming import BlockRing, aligned_rows, block_ranges, buffer_for
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
    if not isinstance(meta, dict) or not isinstance(meta.get("setting"), dict):
        return None
    s = meta["setting"]
    if not all(isinstance(s.get(k), str) for k in ("model", "dataset", "split")):
        return None
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


def damaged(path: str, what: str) -> StoreError:
    """The one-line error for damage a reader found: what, where, and how to repair it."""
    return StoreError(f"features {path}: {what}; the store is damaged: run `diffeat verify --repair`, then the same "
                      "`diffeat extract` to recompute what it unflags")


def matching(settings: Iterable[SettingInfo], *, model: str | None = None, block: int | None = None,
             t: int | None = None, pool: int | None = None, name: str | None = None) -> list[SettingInfo]:
    """The ``settings`` whose given keys match (None: any); without ``name``, extracted settings only.

    ``model`` may be named as the store lists it (``random-resnet50``) or as ``extract --model`` was
    given it (``random:resnet50``, ``microsoft/resnet-50``, a folder): ``model_store_name``.
    """
    wanted = {"model": None if model is None else model_store_name(model), "block": block, "t": t, "pool": pool,
              "name": name}
    return [s for s in settings if all(v is None or getattr(s, k) == v for k, v in wanted.items())
            and (name is not None or s.name is None)]


@dataclass
class FeatureSet:
    """One setting's features with its sample table: what probe and CKA read.

    ``skipped``: rows whose image could not be decoded when the setting was extracted with
    ``--on-bad-image skip`` (NaN in the store, listed with their ids and reasons in
    ``attrs["skipped"]``); probe and CKA leave them out (``kept_rows``).
    """

    info: SettingInfo
    array: zarr.Array
    ids: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    attrs: dict
    location: str = ""  # the store's path or URL (for dask workers, which open the array themselves)
    storage_options: dict | None = None
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def kept_rows(self) -> np.ndarray:
        """Every row index except the skipped ones, ascending."""
        return np.setdiff1d(np.arange(len(self), dtype=np.int64), self.skipped)

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
        zarr-python for a layout it does not know. A chunk that fails its checksum or cannot be
        decoded, and a row of a complete setting that no stored chunk holds (its chunk object was
        lost) and that is not a skipped row, are a one-line ``StoreError`` saying to run ``diffeat verify --repair``: a
        reader never hands out wrong numbers.
        """
        nan_rows: list[tuple[int, int]] | None = [] if self.info.status == "complete" else None
        try:
            block = read_rows(self.array, lo, hi, dtype, out=out, nan_rows=nan_rows)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any codec can fail on a damaged chunk
            raise damaged(self.info.path, f"rows {lo}-{hi - 1} are unreadable ({type(e).__name__}: "
                                          f"{first_line(e, 200)})") from None
        if nan_rows:
            missing = rows_of(nan_rows)
            missing = missing[~np.isin(missing, self.skipped)]
            if len(missing):
                raise damaged(self.info.path, f"rows {missing[:5].tolist()}{' ...' if len(missing) > 5 else ''} "
                                              "are missing (NaN) in a setting marked complete")
        return block

    def load(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read every row into memory."""
        return self.read(0, len(self), dtype)

    def iter_blocks(self, rows: int = 4096, dtype: np.dtype | type = np.float32, *, prefetch: int = 1,
                    reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` over contiguous row blocks, aligned to whole chunks.

        ``rows`` is rounded up to a multiple of the chunk rows, so each stored chunk is
        decoded once; the next block is read in a thread while the caller uses this one
        (``prefetch`` blocks ahead; 0 reads in the caller's thread). Memory holds
        ``2 + prefetch`` blocks at a time (out-of-core).

        ``reuse=True`` decodes into the same ``2 + prefetch`` buffers over and over
        (:class:`~diffeat.store.streaming.BlockRing`): about 30% less CPU per pass, but a
        block is only valid until the next one is requested, so copy what you keep.
        """
        ranges = self.block_ranges(rows)
        ring = None
        if reuse:
            out_dtype = self.array.dtype if dtype is None else dtype
            ring = BlockRing.for_blocks(ranges, prefetch, tuple(self.array.shape[1:]), out_dtype)
        blocks = ((lo, self.read(lo, hi, dtype, out=buffer_for(ring, lo, hi))) for lo, hi in ranges)
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
    ``damaged_ok=True`` (``diffeat verify``) opens a store whose root metadata is
    unreadable instead of refusing it: ``root`` is then None and ``root_problem`` says why.
    """

    def __init__(self, location: str | Path, *, mode: str = "r", storage_options: dict | None = None,
                 damaged_ok: bool = False):
        self.location = check_location(location)
        self.mode = mode
        self.storage_options = storage_options
        self.root_problem: str | None = None
        read_only = mode == "r"
        if not read_only and not is_url(self.location):
            _check_local_writable(self.location)
        from diffeat.store.objects import make_zarr_store

        store = self.zarr_store = make_zarr_store(self.location, read_only=read_only, storage_options=storage_options)
        try:
            if read_only:
                self.root = zarr.open_group(store=store, mode="r")
            else:
                self.root = _open_or_create_root(store)
            attrs = dict(self.root.attrs).get("diffeat")
            fmt = attrs.get("store_format") if isinstance(attrs, dict) else None
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
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged zarr.json fails in json, zarr or numpy
            problem = f"the root metadata (zarr.json) is unreadable ({type(e).__name__}: {first_line(e, 200)})"
            if not damaged_ok:
                raise StoreError(f"feature store {self.location}: {problem}; run `diffeat verify --repair`") from None
            self.root, self.root_problem, fmt = None, problem, STORE_FORMAT
        if fmt is None:
            problem = f"{self.location} is a Zarr group but not a diffeat feature store (no attrs.diffeat)"
        elif not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > STORE_FORMAT:
            problem = (f"{self.location} has store format {fmt!r}; this diffeat reads format {STORE_FORMAT}: "
                       "upgrade diffeat")
        else:
            return
        if not damaged_ok:
            raise StoreError(problem)
        self.root_problem = f"the root attributes do not describe a format {STORE_FORMAT} feature store ({problem})"

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

    def open_array(self, path: str, mode: str = "r") -> zarr.Array:
        """The zarr array at ``path``; a ``StoreError`` naming it when its metadata is missing or unreadable."""
        try:
            return zarr.open_array(store=self.zarr_store, path=path, mode=mode)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged zarr.json fails in json, zarr or numpy
            raise StoreError(f"{path} in {self.location}: its metadata is missing or unreadable "
                             f"({type(e).__name__}: {first_line(e, 200)}); run `diffeat verify --repair`") from None

    # -- listing ------------------------------------------------------------------------------
    def list_settings(self, *, walk: bool = False) -> list[SettingInfo]:
        """Every feature array in the store, sorted by model, dataset, split, block, t, pool.

        Read from the catalog (``_catalog/``: one listing) when the store has one and every
        entry is intact; ``walk=True``, a store without a catalog, or a damaged entry lists
        the arrays themselves instead (``array_paths``), leaving out (with a warning) any
        whose metadata is unreadable.
        """
        from diffeat.store.catalog import read_catalog

        # Only a store whose root says so has an entry for every setting: one made before the
        # catalog existed is walked until `diffeat verify --repair` fills its catalog in.
        attrs = dict(self.root.attrs).get("diffeat", {}) if self.root is not None else {}
        entries = read_catalog(self.objects) if attrs.get("catalog") and not walk else None
        out = [_info_from_entry(e) for e in entries] if entries is not None else self._walk()
        key = lambda s: (s.model, s.dataset, s.split, s.name or "", s.block or 0, s.t or 0, s.pool or 0)  # noqa: E731
        return sorted(out, key=key)

    def array_paths(self) -> list[str]:
        """Path of every ``data`` array under ``features/``, from one listing of the objects."""
        suffix = "/data/zarr.json"
        return sorted(k[: -len("/zarr.json")] for k in self.objects.list("features") if k.endswith(suffix))

    def _walk(self) -> list[SettingInfo]:
        out = []
        for path in self.array_paths():
            try:
                info = _info_from_array(path, self.open_array(path))
            except StoreError as e:
                if "metadata" not in str(e):
                    raise  # access denied, unreachable ...: not damage
                logger.warning("%s: left out of the listing", e)
                continue
            if info is None:
                logger.warning("%s has no readable diffeat attributes: left out; run `diffeat verify`", path)
            else:
                out.append(info)
        return out

    def find(self, *, dataset: str, split: str, block: int | None = None, t: int | None = None,
             pool: int | None = None, model: str | None = None, name: str | None = None) -> SettingInfo:
        """The one setting that matches (see :func:`matching`), or a ``StoreError`` saying what exists."""
        of_dataset = [s for s in self.list_settings() if s.dataset == dataset]
        candidates = [s for s in of_dataset if s.split == split]
        wanted = {"model": None if model is None else model_store_name(model), "block": block, "t": t, "pool": pool,
                  "name": name}
        matches = matching(candidates, **wanted)
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
        return sorted(self.sample_tables(dataset))

    def sample_tables(self, dataset: str) -> dict[str, list[str]]:
        """``{split: [manifest12, ...]}``: the sample tables of ``dataset``, from one listing of the objects
        (so a damaged group's metadata on the way does not hide them)."""
        out: dict[str, list[str]] = {}
        for key in self.objects.list(f"datasets/{check_name(dataset, 'dataset')}"):
            parts = key.split("/")
            if len(parts) == 5 and parts[4] == "zarr.json":
                out.setdefault(parts[2], []).append(parts[3])
        return {split: sorted(keys) for split, keys in out.items()}

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
        """``(ids, labels, class_names)`` of a dataset split stored in this store.

        A table that is incomplete, unreadable (a chunk failing its checksum) or inconsistent
        (labels outside the classes, columns of different lengths) is a ``StoreError``.
        """
        base = f"datasets/{check_name(dataset, 'dataset')}/{check_name(split, 'split')}"
        keys = self.sample_tables(dataset).get(split, [])
        if not keys:
            raise StoreError(f"no sample table for {dataset}/{split} in {self.location}")
        if manifest_sha256 is not None:
            keys = [k for k in keys if manifest_sha256.startswith(k)]
        if len(keys) != 1:
            raise StoreError(
                f"{len(keys)} sample tables for {dataset}/{split} in {self.location}"
                + ("" if keys else f" matching manifest {manifest_sha256}")
            )
        path = f"{base}/{keys[0]}"
        try:
            group = zarr.open_group(store=self.zarr_store, path=path, mode="r")
            attrs = dict(group.attrs).get("diffeat")
            ids = np.array(group["id"][:].tolist(), dtype=str)
            labels = np.asarray(group["label"][:], dtype=np.int64)
            names = [str(c) for c in group["class_name"][:]]
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any codec or metadata can fail on a damaged table
            raise StoreError(f"sample table {path} in {self.location} is unreadable ({type(e).__name__}: "
                             f"{first_line(e, 200)}): run `diffeat verify --repair`, then the same `diffeat extract`"
                             ) from None
        if not isinstance(attrs, dict) or not attrs.get("complete") or (
                manifest_sha256 is not None and attrs.get("manifest_sha256") != manifest_sha256):
            raise StoreError(f"sample table {path} in {self.location} is incomplete or not the one its features "
                             "were extracted from: run `diffeat verify`")
        if len(labels) != len(ids) or (len(labels) and (labels.min() < 0 or labels.max() >= len(names))):
            raise StoreError(f"sample table {path} in {self.location} is inconsistent ({len(ids)} ids, "
                             f"{len(labels)} labels for {len(names)} classes): run `diffeat verify`")
        return ids, labels, names

    def open_features(self, *, dataset: str, split: str, block: int | None = None, t: int | None = None,
                      pool: int | None = None, model: str | None = None, name: str | None = None,
                      require_complete: bool = True) -> FeatureSet:
        """Open one setting with its sample table (see ``find`` for matching).

        The setting's identity is taken from its array's own attributes and checked against
        the listing (catalog entry), its folder name and its recorded settings
        (``diffeat.store.integrity``); a complete setting must have every ledger flag set.
        Anything that does not hold is a one-line ``StoreError`` saying to run ``diffeat verify``.
        """
        from diffeat.store.integrity import setting_problems

        info = self.find(dataset=dataset, split=split, block=block, t=t, pool=pool, model=model, name=name)
        array = self.open_array(info.path)
        try:
            meta = dict(array.attrs).get("diffeat")
        except Exception as e:  # noqa: BLE001 - attributes of a damaged zarr.json
            raise damaged(info.path, f"its attributes are unreadable ({type(e).__name__})") from None
        status = meta.get("status") if isinstance(meta, dict) else None
        if require_complete and status != "complete":
            raise StoreError(
                f"features {info.path} are not complete (status {status!r}): finish them with "
                "`diffeat extract` (it resumes) before reading"
            )
        problems = setting_problems(info.path, meta, tuple(array.shape), str(array.dtype))
        if not problems:
            listed = {k: getattr(info, k) for k in ("model", "dataset", "split", "block", "t", "pool", "name")}
            if info.settings_hash != meta["settings_hash"] or listed != {k: meta["setting"].get(k) for k in listed}:
                problems.append(f"the catalog lists it as {info.label()} ({info.settings_hash[:12]}...), its "
                                f"attributes say {meta['setting']} ({meta['settings_hash'][:12]}...)")
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise StoreError(f"features {info.path} cannot be trusted: {problems[0]}{more}; run `diffeat verify`")
        info = dataclasses.replace(info, status=meta["status"])  # the array is the truth
        if info.status == "complete":
            self._check_ledger(info.path, array, meta)
        ids, labels, classes = self.sample_table(dataset, split, meta.get("manifest_sha256"))
        if len(ids) != array.shape[0]:
            raise StoreError(f"{info.path} has {array.shape[0]} rows but its sample table has {len(ids)}")
        skipped = _skipped_rows(info.path, meta, ids)
        return FeatureSet(info, array, ids, labels, classes, meta, self.location, self.storage_options, skipped)

    def _check_ledger(self, path: str, array: zarr.Array, meta: dict) -> None:
        """A complete setting has one set flag per unit of its layout; otherwise its data cannot be trusted."""
        layout = meta.get("layout") if isinstance(meta.get("layout"), dict) else {}
        unit_rows = int((array.shards or array.chunks)[0])
        n_units = -(-int(array.shape[0]) // unit_rows)
        if layout.get("unit_rows") != unit_rows or layout.get("n_units") != n_units:
            raise damaged(path, f"its recorded layout {layout.get('unit_rows')} rows x {layout.get('n_units')} units "
                                f"is not the array's {unit_rows} x {n_units}")
        group = path.rsplit("/", 1)[0]
        try:
            flags = np.asarray(self.open_array(f"{group}/done")[:])
        except Exception as e:  # noqa: BLE001 - a missing or damaged ledger
            raise damaged(path, f"its completion ledger is unreadable ({first_line(e, 200)})") from None
        if flags.shape != (n_units,) or not flags.all():
            missing = n_units - int(np.count_nonzero(flags[:n_units])) if flags.ndim == 1 else n_units
            raise damaged(path, f"it is marked complete but {missing} of {n_units} units are not flagged done")


def _skipped_rows(path: str, meta: dict, ids: np.ndarray) -> np.ndarray:
    """Rows recorded as skipped (undecodable images), checked against the sample table's ids."""
    records = meta.get("skipped") or []
    try:
        rows = np.array([int(r["row"]) for r in records], dtype=np.int64)
        ok = all(0 <= r < len(ids) and ids[r] == str(rec["id"]) for r, rec in zip(rows, records))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise damaged(path, "its record of skipped rows does not match the sample table")
    return np.unique(rows)


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


def check_writable_location(location: str, storage_options: dict | None = None) -> None:
    """Raise a one-line ``StoreError`` unless a store at ``location`` could be written, creating nothing.

    An existing local store gets a write probe inside it (as ``FeatureStore.check_writable``);
    a new local store, one in the nearest existing parent folder (a temp file, removed at once);
    an object store, an object under ``_writetest/`` put and deleted (object stores have no folders).
    """
    from diffeat.store.objects import ObjectStore

    location = check_location(location)
    if is_url(location):
        ObjectStore(location, storage_options).check_writable()
        return
    _check_local_writable(location)
    path = local_path(location)
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"feature store {location} is a file, not a folder")
        ObjectStore(location).check_writable()
        return
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"feature store {location} cannot be created: {existing} is a file, not a folder")
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".diffeat-writetest-"):
            pass
    except OSError as e:
        raise StoreError(f"feature store {location} cannot be created in {existing} ({type(e).__name__}: "
                         f"{e.strerror or e}): extract needs write access") from e


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
