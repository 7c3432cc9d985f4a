"""Put externally computed features (a ResNet's, a ViT's ...) into a store, next to extracted ones.

An import is a feature array like any other (same chunking, codecs, completion ledger
and publishing, through :class:`~diffeat.store.writer.SettingWriter`), at
``features/<model>/<dataset>/<split>/<name>/data`` with ``setting.name`` set and
block/t/pool null. Its rows follow the store's sample table for that dataset/split;
``ids`` (one per source row) lets an import in another order be checked and realigned.
Its identity hash covers the name, the sample table and the content, so importing the
same thing twice is a no-op and importing different contents under a taken name is an
error unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffeat import __version__
from diffeat.errors import StoreError
from diffeat.runtime.checks import check_choice
from diffeat.store.catalog import entry_key
from diffeat.store.layout import (
    STORE_DTYPES,
    check_name,
    plan_chunks,
    setting_path,
    settings_hash,
)
from diffeat.store.reader import FeatureStore, SettingInfo, open_store
from diffeat.store.writer import SettingWriter, all_finite

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "external"
#: Bytes of whole units written in one zarr assignment: zarr encodes the chunks and shards of one
#: assignment concurrently, so an import of 64 MiB shards one by one ran at 0.7× of plain zarr's
#: ``array[:] = x`` (measured, 262 MB, 2 cores); four at a time keeps both cores busy.
WRITE_BYTES = 256 << 20


@dataclass(frozen=True)
class ImportResult:
    """What an import did: ``outcome`` is ``written``, ``resumed`` or ``cached``."""

    info: SettingInfo
    outcome: str
    reordered: bool


def table_manifest(store: FeatureStore, dataset: str, split: str) -> tuple[str, np.ndarray]:
    """``(manifest_sha256, ids)`` of the one sample table stored for ``dataset``/``split``."""
    tables = store.sample_tables(dataset)
    keys = tables.get(check_name(split, "split"), [])
    if not keys:
        have = ", ".join(f"{dataset}/{s}" for s in sorted(tables)) or "none"
        raise StoreError(
            f"no sample table for {dataset}/{split} in {store.location} (it has: {have}); "
            "an import is checked against the store's sample table, so extract that dataset split first "
            "(or give the dataset's --root)"
        )
    if len(keys) > 1:
        raise StoreError(f"{len(keys)} sample tables for {dataset}/{split} in {store.location}: ambiguous import")
    meta = store.objects.get_json(f"datasets/{dataset}/{split}/{keys[0]}/zarr.json") or {}
    manifest = ((meta.get("attributes") or {}).get("diffeat") or {}).get("manifest_sha256")
    ids, _, _ = store.sample_table(dataset, split, manifest)
    return str(manifest), ids


def _order(table_ids: np.ndarray, ids: Sequence[str] | None, n_rows: int, what: str) -> np.ndarray | None:
    """Source row for each table row (None: already in table order), or a ``StoreError``."""
    if ids is None:
        if n_rows != len(table_ids):
            raise StoreError(f"{what} has {n_rows} rows but the store's sample table has {len(table_ids)} samples "
                             "(pass --ids FILE if the rows are a different set or order)")
        return None
    ids = np.asarray([str(i) for i in ids])
    if len(ids) != n_rows:
        raise StoreError(f"the ids file has {len(ids)} ids but {what} has {n_rows} rows")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"the ids file repeats ids, e.g. {uniq[counts > 1][:3].tolist()}")
    position = {v: k for k, v in enumerate(ids)}
    missing = [v for v in table_ids if v not in position]
    extra = sorted(set(ids) - set(table_ids.tolist()))
    if missing or extra:
        raise StoreError(f"ids do not match the store's sample table: {len(missing)} table ids missing "
                         f"(e.g. {missing[:3]}), {len(extra)} unknown ids (e.g. {extra[:3]})")
    order = np.fromiter((position[v] for v in table_ids), dtype=np.int64, count=len(table_ids))
    return None if np.array_equal(order, np.arange(len(order))) else order


def _rows(array: Any, order: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Table rows ``[lo, hi)`` of the source (gathering in sorted order, then restoring ``order``)."""
    if order is None:
        return np.asarray(array[lo:hi])
    want = order[lo:hi]
    sort = np.argsort(want)
    picked = want[sort]
    if hasattr(array, "get_orthogonal_selection"):  # zarr: one read per touched chunk
        values = np.asarray(array.get_orthogonal_selection((picked,) + (slice(None),) * (array.ndim - 1)))
    else:
        values = np.asarray(array[picked])
    out = np.empty_like(values)
    out[sort] = values
    return out


def _runs(units: list[int], plan, row_bytes: int, max_bytes: int = WRITE_BYTES) -> list[tuple[int, int]]:
    """Rows ``[lo, hi)`` of consecutive ``units``, up to ``max_bytes`` each: one zarr assignment per run."""
    per_run = max(1, max_bytes // max(1, plan.unit_rows * row_bytes))
    runs: list[tuple[int, int]] = []
    start = prev = None
    for u in units:
        if start is not None and (u != prev + 1 or u - start >= per_run):
            runs.append((plan.unit_range(start)[0], plan.unit_range(prev)[1]))
            start = None
        start = u if start is None else start
        prev = u
    if start is not None:
        runs.append((plan.unit_range(start)[0], plan.unit_range(prev)[1]))
    return runs


def import_features(store: FeatureStore | str, dataset: str, split: str, name: str, array: Any, *,
                    attrs: dict | None = None, ids: Sequence[str] | None = None, model: str = DEFAULT_MODEL,
                    store_dtype: str = "float16", overwrite: bool = False, root: str | None = None,
                    classes: str | None = None, chunk_rows: int | None = None,
                    storage_options: dict | None = None) -> ImportResult:
    """Write ``array`` ((N, D) or (N, C, k, k), NumPy/memmap/zarr) into ``store`` as import ``name``.

    ``ids``: the sample id of each source row (checked against the sample table and used to
    put rows in table order); without it N must equal the table's N. ``attrs``: provenance
    to record (source file, model description ...). The store must be open with ``mode="a"``.
    ``root`` (``classes``): when the store has no sample table for the split yet (nothing was
    extracted), read it from the dataset there and store it (once the array is checked); built-in
    datasets need none. ``chunk_rows``: rows per stored chunk (a power of two; default ~2 MiB
    chunks, as extract). ``store`` may be a location (with ``storage_options``): it is then opened
    for writing, or started, only after every value of the array has been checked, so a refused
    import creates nothing.
    """
    check_name(name, "import")
    check_name(model, "model")
    location = store if not isinstance(store, FeatureStore) else None
    if location is None and store.mode != "a":
        raise StoreError(f"{store.location} is open read-only; importing needs mode='a'")
    existing = store if location is None else _existing(location, storage_options)
    check_choice(store_dtype, STORE_DTYPES, "--store-dtype")
    source = str((attrs or {}).get("source") or "the array")
    shape = tuple(int(v) for v in array.shape)
    dtype = np.dtype(array.dtype)
    kind = "real numbers" if dtype.kind in "fiu" else f"{dtype} values"
    if len(shape) not in (2, 4) or dtype.kind not in "fiu":
        raise StoreError(f"{source}: features to import are an (N, D) or (N, C, k, k) array of real numbers, not "
                         f"shape {shape} of {kind}")
    if shape[0] == 0 or 0 in shape[1:]:
        raise StoreError(f"{source}: shape {shape} holds no features (every dimension must be at least 1)")
    new_table = None
    held = existing.splits(dataset) if existing is not None else []
    if split not in held and (root is not None or _builtin(dataset)):
        from diffeat.data import open_dataset

        new_table = open_dataset(dataset, root, classes=classes).samples(split)  # stored once the array is checked
    elif existing is None:
        raise StoreError(f"no feature store at {location}: start one with `diffeat extract`, or give the dataset's "
                         "--root so that the import reads the split's sample table from it")
    if new_table is not None:
        manifest, table_ids = new_table.manifest_sha256(), np.array(new_table.ids, dtype=str)
    else:
        manifest, table_ids = table_manifest(existing, dataset, split)
    order = _order(table_ids, ids, shape[0], f"{source} ({shape})")
    out_shape = (len(table_ids),) + shape[1:]
    row_bytes = int(np.prod(out_shape[1:])) * np.dtype(store_dtype).itemsize
    plan = plan_chunks(out_shape[0], row_bytes, chunk_rows)

    # Identity: the content as it will be stored, in table order. The same pass checks every value,
    # so nothing is created in the store for an array that cannot be stored.
    # sha256 (1.1 GB/s, GIL released) hashes one unit in a thread while the next is read and checked.
    digest = hashlib.sha256()
    with ThreadPoolExecutor(1, thread_name_prefix="diffeat-import-hash") as hasher:
        hashing: Future | None = None
        for u in range(plan.n_units):
            lo, hi = plan.unit_range(u)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by _check_finite
                block = np.ascontiguousarray(_rows(array, order, lo, hi), dtype=store_dtype)
            _check_finite(block, lo, source, store_dtype)
            if hashing is not None:
                hashing.result()  # in order: one unit at a time
            hashing = hasher.submit(digest.update, block)
        if hashing is not None:
            hashing.result()
    settings = {"import": name, "model": model, "dataset": {"name": dataset, "split": split,
                                                              "manifest_sha256": manifest},
                "shape": list(out_shape), "store_dtype": store_dtype, "content_sha256": digest.hexdigest()}
    key = settings_hash(settings)
    path = setting_path(model, dataset, split, name)
    if location is not None:
        store = open_store(location, mode="a", storage_options=storage_options)
    _check_existing(store, dataset, split, name, model, path, key, overwrite)
    if new_table is not None:
        from diffeat.store.writer import write_sample_table

        write_sample_table(store, new_table)

    meta = {"settings": settings, "settings_hash": key, "manifest_sha256": manifest,
            "setting": {"model": model, "dataset": dataset, "split": split, "block": None, "t": None, "pool": None,
                        "name": name},
            "source": attrs or {}, "versions": {"diffeat": __version__}}
    writer = SettingWriter.open(store, path, out_shape, store_dtype, meta, label=f"import {name}",
                                chunk_rows=chunk_rows)
    outcome = "cached" if not writer.pending else "resumed" if len(writer.pending) < plan.n_units else "written"
    writer.claim_all()
    for lo, hi in _runs(sorted(writer.claimed), plan, row_bytes):
        writer.add(np.arange(lo, hi), _rows(array, order, lo, hi))
    if not writer.publish():
        raise StoreError(f"import {name}: some units were not written ({path}); run the import again to resume")
    info = store.find(dataset=dataset, split=split, name=name, model=model)
    logger.info("import %s: %s %s -> %s", name, outcome, out_shape, path)
    return ImportResult(info, outcome, order is not None)


def _check_finite(block: np.ndarray, lo: int, source: str, store_dtype: str) -> None:
    """Refuse NaN, infinities and values beyond the store dtype's range, naming the first rows (table order)."""
    if all_finite(block):
        return
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    if finite.all():
        return
    rows = (lo + np.flatnonzero(~finite))[:5].tolist()
    if store_dtype == "float16":
        raise StoreError(f"{source}: rows {rows} hold NaN, inf, or values beyond float16's range (+-65504): "
                         "fix them, or import with --store-dtype float32 if they are only large")
    raise StoreError(f"{source}: rows {rows} hold NaN or inf values: features must be finite")


def _check_existing(store: FeatureStore, dataset: str, split: str, name: str, model: str, path: str, key: str,
                    overwrite: bool) -> None:
    """Refuse to shadow or silently replace another import of the same name."""
    for s in store.list_settings():
        if s.dataset == dataset and s.split == split and s.name == name and s.model != model:
            raise StoreError(f"an import named {name!r} for {dataset}/{split} already exists under model "
                             f"{s.model!r}; pick another --name")
    if f"{path}/data" not in store.root:
        return
    old = dict(store.root[f"{path}/data"].attrs).get("diffeat", {})
    if old.get("settings_hash") == key:
        return  # same contents: resume or no-op
    if old.get("status") != "complete" and not overwrite:
        # An import that never finished (an earlier diffeat created its array before checking the values):
        # nothing of it can be read, so a corrected import replaces it.
        logger.warning("replacing the unfinished import %s (%s)", name, path)
    elif not overwrite:
        raise StoreError(f"an import named {name!r} for {dataset}/{split} already exists with different contents "
                         f"({path}); use --overwrite to replace it")
    logger.warning("replacing import %s (%s)", name, path)
    del store.root[path]
    store.objects.delete(entry_key(old.get("settings_hash", "")))


def _existing(location: str, storage_options: dict | None) -> FeatureStore | None:
    """The store at ``location`` opened read-only, or None when there is none yet (an import may start one)."""
    try:
        return open_store(location, mode="r", storage_options=storage_options)
    except StoreError as e:
        if str(e).startswith("no feature store at"):
            return None
        raise


def _builtin(dataset: str) -> bool:
    """Whether ``dataset`` is a built-in layout (its sample table needs no files)."""
    from diffeat.data import DATASETS

    return dataset in DATASETS and DATASETS[dataset].builtin


def sample_rows(dataset: str, splits: Sequence[str], *, store: str | None = None,
                storage_options: dict | None = None, root: str | None = None,
                classes: str | None = None) -> list[dict]:
    """Rows ``{split, row, id, path, label, class_name}`` of splits, in feature-row order (``diffeat ids``).

    From ``store`` when it holds the split's sample table, else from the dataset (``root``;
    none for built-in datasets): the same rows either way, since a table's order is its
    manifest's. ``splits`` empty: every split the store holds, or the dataset's standard pair.
    """
    from diffeat.data import open_dataset

    fs = open_store(store, storage_options=storage_options) if store else None
    held = fs.splits(dataset) if fs is not None else []  # one listing of the store (a request on S3)
    layout = None
    if not held:  # nothing of the dataset in the store: its rows come from the dataset itself
        layout = open_dataset(dataset, root, classes=classes)
    if not splits:
        splits = held or list(layout.standard_splits)
    out: list[dict] = []
    for split in splits:
        if split in held:
            table = fs.sample_rows(dataset, split)
        else:
            if layout is None:
                raise StoreError(f"no sample table for {dataset}/{split} in {fs.location} (it holds: "
                                 f"{', '.join(held) or 'none'}); give --root to read the dataset")
            t = layout.samples(split)
            table = {"id": np.array(t.ids), "path": np.array(t.relpaths), "label": t.labels,
                     "class_name": np.array(t.class_names)[t.labels]}
        out += [{"split": split, "row": i, "id": str(table["id"][i]), "path": str(table["path"][i]),
                 "label": int(table["label"][i]), "class_name": str(table["class_name"][i])}
                for i in range(len(table["id"]))]
    return out
