"""Write feature settings into a store: whole units, a completion ledger, and publishing.

Rules that keep a store honest (see docs/store-format.md):

* a writer only ever writes whole units (a chunk, or a shard when sharded), in one
  assignment, so no two writers share a chunk or shard object (zarr-python loses
  data silently when they do);
* after a unit's data is written its ledger flag ``done[u]`` is set, each flag being
  its own object; a crash between the two only means the unit is redone, with
  bitwise the same values (noise is seeded per sample);
* ``status`` becomes ``"complete"`` only once every flag is set.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import logging
import platform
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zarr

from diffeat import __version__
from diffeat.errors import StoreError
from diffeat.store import catalog
from diffeat.store.claims import Claims
from diffeat.store.layout import (
    STORE_FORMAT,
    ChunkPlan,
    plan_chunks,
    settings_hash,
    table_path,
)
from diffeat.store.reader import FeatureStore

logger = logging.getLogger(__name__)

DIMENSIONS = ("sample", "channel", "y", "x")
#: Folder of the skip records: ``_skipped/<settings-hash>/<unit>.json`` lists the rows of a unit whose
#: image could not be decoded (``--on-bad-image skip``), written before the unit's ledger flag.
SKIPPED = "_skipped"


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def creator() -> dict:
    """Who and where: recorded with every array."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"user": user, "host": platform.node(), "diffeat": __version__}


def compressors() -> list:
    """blosc-lz4 with bitshuffle, then crc32c: cheap, and a corrupt chunk fails loudly on read."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def table_compressors() -> list:
    """zstd (zarr's default), then crc32c: a flipped bit in a label or an id fails the read, never mislabels."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


def ledger_compressors() -> list:
    """crc32c alone (a flag is one byte): a damaged flag fails the read instead of meaning "done"."""
    from zarr.codecs import Crc32cCodec

    return [Crc32cCodec()]


def write_sample_table(store: FeatureStore, table) -> str:
    """Store a dataset split's sample table once (keyed by its manifest hash); return its path."""
    digest = table.manifest_sha256()
    path = table_path(table.dataset, table.split, digest)
    Claims(store.objects, f"table-{digest}").create_once(
        lambda: _table_complete(store, path), lambda: _write_table(store, table, path, digest), f"sample table {path}")
    return path


def _table_complete(store: FeatureStore, path: str) -> bool:
    meta = store.objects.get_json(f"{path}/zarr.json")
    return bool(meta and meta.get("attributes", {}).get("diffeat", {}).get("complete"))


def _write_table(store: FeatureStore, table, path: str, digest: str) -> None:
    group = _require_group(store.root, path)
    n, k = len(table), len(table.class_names)
    ids = np.array(table.ids, dtype=str)
    for name, values, dims in (
        ("sample", ids, ("sample",)),  # the coordinate xarray joins features and labels on
        ("id", ids, ("sample",)),
        ("path", np.array(table.relpaths, dtype=str), ("sample",)),
        ("label", np.asarray(table.labels, dtype=np.int64), ("sample",)),
        ("class_name", np.array(table.class_names, dtype=str), ("class",)),
    ):
        arr = group.create_array(name, shape=values.shape, dtype=values.dtype if values.dtype.kind != "U" else str,
                                 chunks=(max(1, len(values)),), dimension_names=dims, overwrite=True,
                                 compressors=table_compressors())
        arr[:] = values
    # Written last: a table is only trusted once all four arrays are in place.
    group.attrs["diffeat"] = {
        "dataset": table.dataset, "split": table.split, "manifest_sha256": digest, "n": n, "n_classes": k,
        "root": str(table.root) if table.root is not None else None, "complete": True, "created": now(),
    }
    consolidate(store, path)


def consolidate(store: FeatureStore, group_path: str) -> None:
    """Write the group's consolidated metadata (its arrays' metadata in its own ``zarr.json``).

    Called when a setting is published (and by ``verify --repair`` after it changes the
    status) and when a sample table is written, so ``xr.open_zarr(<store>/<group path>)``
    opens a setting in one read and without xarray's "no consolidated metadata" warning.
    diffeat itself always reads an array's own ``zarr.json``, never this copy.
    """
    import warnings

    with warnings.catch_warnings():
        # zarr says consolidated metadata is not (yet) in the v3 spec; zarr and xarray both read it.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store.zarr_store, path=group_path)


def _require_group(root: zarr.Group, path: str) -> zarr.Group:
    """``require_group`` that tolerates another writer creating the same (identical) groups at once."""
    from zarr.errors import ContainsGroupError

    for _ in range(5):
        try:
            return root.require_group(path)
        except ContainsGroupError:
            time.sleep(0.05)
    return root.require_group(path)


@dataclass
class SettingWriter:
    """Writes one setting (one feature array) unit by unit, claiming each unit first.

    ``pending``: units whose ledger flag is not set. ``claimed``: pending units this
    writer holds a claim on; only those are written (see ``diffeat.store.claims``).
    """

    array: zarr.Array
    done: zarr.Array
    plan: ChunkPlan
    path: str
    label: str
    store: FeatureStore
    claims: Claims
    _buffers: dict[int, np.ndarray] = field(default_factory=dict)
    _filled: dict[int, int] = field(default_factory=dict)
    _skips: dict[int, dict[int, dict]] = field(default_factory=dict)  # unit -> row -> {"id", "reason"}
    _skip_objects: set[int] = field(default_factory=set)  # units with a skip record in the store
    pending: set[int] = field(default_factory=set)
    claimed: set[int] = field(default_factory=set)
    written: int = 0  # units this writer wrote

    @property
    def settings_hash(self) -> str:
        """The setting's identity hash (the name of its claims and skip-record folders)."""
        return self.claims.prefix.rsplit("/", 1)[-1]

    @classmethod
    def open(cls, store: FeatureStore, path: str, shape: tuple[int, ...], dtype: str, attrs: dict,
             label: str, *, chunk_rows: int | None = None, owner: str | None = None) -> SettingWriter:
        """Create the setting's arrays, or reopen them to resume; ``pending`` lists units to do.

        Creation is claimed (pseudo-unit ``create``), so when several writers open a new
        setting at once exactly one writes its metadata and the others wait for it.
        """
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        plan = plan_chunks(shape[0], row_bytes, chunk_rows)
        data_path = f"{path}/data"
        claims = Claims(store.objects, attrs.get("settings_hash") or settings_hash(attrs), owner=owner)
        claims.create_once(lambda: _exists(store, data_path), lambda: _create(store, path, shape, dtype, attrs, plan),
                           data_path)
        array = zarr.open_array(store=store.zarr_store, path=data_path, mode="r+")
        meta = dict(array.attrs).get("diffeat", {})
        if tuple(array.shape) != tuple(shape) or str(array.dtype) != dtype:
            raise StoreError(
                f"{data_path} exists with shape {array.shape} {array.dtype}, expected {shape} {dtype}: "
                "the store is inconsistent; run `diffeat verify`"
            )
        layout = meta.get("layout", {})
        plan = ChunkPlan(shape[0], int(layout.get("chunk_rows", plan.chunk_rows)), layout.get("shard_rows"))
        # A ledger that was deleted is made again, empty: every unit is then recomputed (`diffeat verify
        # --repair` instead keeps the units whose data still read back whole).
        claims.create_once(lambda: store.objects.get(f"{path}/done/zarr.json") is not None,
                           lambda: create_ledger(store, path, plan), f"{path}/done")
        done = zarr.open_array(store=store.zarr_store, path=f"{path}/done", mode="r+")
        writer = cls(array, done, plan, data_path, label, store, claims)
        writer._skip_objects = {int(k.rsplit("/", 1)[-1].split(".")[0]) for k in store.objects.list(writer.skip_prefix)
                                if k.rsplit("/", 1)[-1].split(".")[0].isdigit()}
        writer.refresh()
        if not writer.pending and meta.get("status") == "complete":
            writer.clean_claims()  # a finished setting needs no claim: drop any a killed writer left
        return writer

    def clean_claims(self) -> None:
        """Remove every claim object of this setting (only once every unit is flagged)."""
        for key in self.store.objects.list(self.claims.prefix):
            self.store.objects.delete(key)

    @property
    def skip_prefix(self) -> str:
        """Where the skip records of this setting's units are kept: ``_skipped/<settings-hash>``."""
        return f"{SKIPPED}/{self.settings_hash}"

    @property
    def status(self) -> str:
        """The status recorded in the array's attributes."""
        return dict(self.array.attrs)["diffeat"].get("status", "in_progress")

    def refresh(self) -> None:
        """Re-read the ledger: units written by anyone since are no longer pending."""
        flags = np.asarray(self.done[:])
        self.pending = {u for u in range(self.plan.n_units) if not flags[u]}
        self.claimed &= self.pending

    def units_in(self, lo: int, hi: int) -> list[int]:
        """Pending units whose rows lie in [lo, hi)."""
        first, last = lo // self.plan.unit_rows, -(-hi // self.plan.unit_rows)
        return [u for u in range(first, min(last, self.plan.n_units)) if u in self.pending]

    def claim(self, units: list[int], current=None) -> list[int]:
        """Claim pending ``units``; return those this writer now holds (and should compute)."""
        won = [int(u) for u in self.claims.try_claim([str(u) for u in units], current)]
        if won:
            # Claim, then check: a unit another writer finished (and released) since this
            # writer last read the ledger looks unclaimed, but its flag is set.
            lo, hi = min(won), max(won) + 1
            flags = np.asarray(self.done[lo:hi])
            for u in [u for u in won if flags[u - lo]]:
                self.claims.release(str(u))
                self.pending.discard(u)
            won = [u for u in won if not flags[u - lo]]
        self.claimed.update(won)
        return won

    def claim_all(self) -> None:
        """Claim every pending unit that is free (a writer that owns the whole setting)."""
        self.claim(sorted(self.pending))

    def abandon(self) -> None:
        """Give back the claims of units this writer will not write (after an error)."""
        for u in sorted(self.claimed):
            self.claims.release(str(u))
            self._buffers.pop(u, None)
            self._filled.pop(u, None)
            self._skips.pop(u, None)
        self.claimed.clear()

    def rows_needed(self) -> np.ndarray:
        """Row indices of every claimed unit, ascending."""
        parts = [np.arange(*self.plan.unit_range(u)) for u in sorted(self.claimed)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def add(self, rows: np.ndarray, values: np.ndarray, skipped: dict[int, dict] | None = None) -> None:
        """Buffer feature rows; every claimed unit that becomes full is written and flagged.

        Rows that are exactly whole claimed units, in order (what an import passes), are written
        in one assignment without a copy into a unit buffer. ``skipped``: rows whose image could
        not be decoded (``--on-bad-image skip``), each with ``{"id", "reason"}``; they are stored
        as NaN and recorded with their unit (always through the unit buffers).
        """
        if not skipped and self._write_whole(rows, values):
            return
        units = rows // self.plan.unit_rows
        skipped = skipped or {}
        for u in np.unique(units):
            u = int(u)
            if u not in self.claimed:
                continue
            lo, hi = self.plan.unit_range(u)
            sel = units == u
            buf = self._buffers.get(u)
            if buf is None:
                buf = self._buffers[u] = np.empty((hi - lo,) + self.array.shape[1:], dtype=self.array.dtype)
                self._filled[u] = 0
                self._skips[u] = {}
            bad = np.array([int(r) in skipped for r in rows[sel]], dtype=bool)
            buf[rows[sel] - lo] = _cast(values[sel], self.array.dtype, self.label, rows[sel], bad)
            for r in rows[sel][bad]:
                self._skips[u][int(r)] = skipped[int(r)]
            self._filled[u] += int(sel.sum())
            if self._filled[u] == hi - lo:
                self._write_unit(u, lo, hi)

    def _write_whole(self, rows: np.ndarray, values: np.ndarray) -> bool:
        """Write ``rows`` straight to the array when they are one ascending run of whole claimed units
        that nothing was buffered for; False (nothing done) otherwise."""
        ur, n = self.plan.unit_rows, len(rows)
        if n == 0:
            return False
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo != n or lo % ur or (hi % ur and hi != self.plan.n) or (n > 1 and not (np.diff(rows) == 1).all()):
            return False
        units = range(lo // ur, -(-hi // ur))
        if any(u not in self.claimed or u in self._buffers for u in units):
            return False
        # Whole units in one assignment: every chunk or shard object is written entirely, by this writer.
        self.array[lo:hi] = _cast(values, self.array.dtype, self.label, rows)
        for u in units:
            if u in self._skip_objects:
                self.store.objects.delete(f"{self.skip_prefix}/{u}.json")  # its images decode now
        self.done[units.start:units.stop] = 1  # only after the data objects are in place
        for u in units:
            self.pending.discard(u)
            self.claimed.discard(u)
            self.claims.release(str(u))
            self.written += 1
        return True

    def _write_unit(self, u: int, lo: int, hi: int) -> None:
        self.array[lo:hi] = self._buffers.pop(u)
        self._filled.pop(u)
        skips = self._skips.pop(u, {})
        key = f"{self.skip_prefix}/{u}.json"
        if skips:  # before the flag: a flagged unit's NaN rows are always explained
            records = [{"row": r, **skips[r]} for r in sorted(skips)]
            self.store.objects.put(key, json.dumps({"unit": u, "rows": records}, sort_keys=True).encode())
        elif u in self._skip_objects:
            self.store.objects.delete(key)  # the unit's images decode now: its old record is gone
        self.done[u] = 1  # only after the data object is in place
        self.pending.discard(u)
        self.claimed.discard(u)
        self.claims.release(str(u))
        self.written += 1

    def publish(self) -> bool:
        """Mark the setting complete if every unit is flagged; return whether it is.

        Attributes first, then the catalog entry: a catalog saying ``complete`` implies
        the array says so too.
        """
        self.refresh()
        if self.pending:
            return False
        meta = dict(self.array.attrs)["diffeat"]
        if meta.get("status") != "complete":
            meta.update(status="complete", completed=now())
            skipped = read_skips(self.store.objects, self.settings_hash)
            if skipped:
                meta["skipped"] = skipped
            self.array.attrs["diffeat"] = meta
        consolidate(self.store, self.path.rsplit("/", 1)[0])
        entry = catalog.make_entry(self.path, meta, tuple(self.array.shape), str(self.array.dtype),
                                   stored_bytes=catalog.stored_bytes(self.store.objects, self.path))
        catalog.put_entry(self.store.objects, entry)
        # Every unit is flagged: no claim on this setting is needed any more. Generations a killed
        # writer left (after its flag, before its release) would otherwise stay for good.
        self.clean_claims()
        return True


def read_skips(objects, digest: str) -> list[dict]:
    """The skip records of every unit of a setting, as one list ``[{"row", "id", "reason"}]`` by row."""
    keys = [k for k in objects.list(f"{SKIPPED}/{digest}") if k.endswith(".json")]
    rows: dict[int, dict] = {}
    for data in objects.get_many(keys).values():
        for record in json.loads(data).get("rows", []):
            rows[int(record["row"])] = {"row": int(record["row"]), "id": str(record["id"]),
                                        "reason": str(record["reason"])}
    return [rows[r] for r in sorted(rows)]


def create_ledger(store: FeatureStore, path: str, plan: ChunkPlan) -> None:
    """The completion ledger of a setting: one flag (its own object, checksummed) per unit, all 0."""
    group = _require_group(store.root, path)
    group.create_array("done", shape=(plan.n_units,), dtype="uint8", chunks=(1,), fill_value=0,
                       dimension_names=("unit",), overwrite=True, compressors=ledger_compressors())


def _exists(store: FeatureStore, data_path: str) -> bool:
    # Through the object layer, not zarr's node cache: another process may just have created it.
    return store.objects.get(f"{data_path}/zarr.json") is not None


def _create(store: FeatureStore, path: str, shape: tuple[int, ...], dtype: str, attrs: dict, plan: ChunkPlan) -> None:
    group = _require_group(store.root, path)
    meta = {**attrs, "status": "in_progress", "created": now(), "created_by": creator(),
            "store_format": STORE_FORMAT,
            "layout": {"chunk_rows": plan.chunk_rows, "shard_rows": plan.shard_rows,
                       "unit_rows": plan.unit_rows, "n_units": plan.n_units,
                       "codecs": "blosc(lz4, 5, bitshuffle) + crc32c"}}
    # The ledger first: an array without a ledger would look like it has nothing to resume.
    create_ledger(store, path, plan)
    chunk = (plan.chunk_rows,) + tuple(shape[1:])
    shard = (plan.shard_rows,) + tuple(shape[1:]) if plan.shard_rows else None
    group.create_array(
        "data", shape=shape, dtype=dtype, chunks=chunk, shards=shard, compressors=compressors(),
        fill_value=float("nan"), dimension_names=DIMENSIONS[: len(shape)], attributes={"diffeat": meta},
        overwrite=True,
    )
    setting = attrs.get("setting", {})
    if "manifest_sha256" in attrs and setting.get("dataset") and setting.get("split"):
        # The rows' sample ids as the `sample` coordinate: xarray joins features and labels by id.
        ids, _, _ = store.sample_table(setting["dataset"], setting["split"], attrs["manifest_sha256"])
        if len(ids) == shape[0]:
            sample = group.create_array("sample", shape=(len(ids),), dtype=str, chunks=(max(1, len(ids)),),
                                        dimension_names=("sample",), overwrite=True, compressors=table_compressors())
            sample[:] = ids
    catalog.create_entry(store.objects, catalog.make_entry(f"{path}/data", meta, shape, dtype))


def _cast(values: np.ndarray, dtype: np.dtype, label: str, rows: np.ndarray,
          skipped: np.ndarray | None = None) -> np.ndarray:
    """Cast to the store dtype, refusing non-finite values instead of storing them.

    ``skipped`` rows (images that could not be decoded) are stored as NaN, the fill value.
    """
    out = values.astype(dtype, copy=False)
    if skipped is not None and skipped.any():
        out = np.array(out, copy=True)
        out[skipped] = np.nan
    elif bool(all_finite(out)):
        return out
    finite = np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    if skipped is not None:
        finite |= skipped
    if not finite.all():
        bad = rows[~finite][:5].tolist()
        src_finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        why = (f"overflow when casting to {dtype} (use --store-dtype float32)" if src_finite[~finite].all()
               else "the model produced NaN/inf")
        raise StoreError(f"{label}: non-finite features for rows {bad}: {why}")
    return out


#: Values per step of the float16 finiteness test: its temporary stays in L2 (a temporary as large as
#: the array cost page faults: 0.040 s per 49 M values against 0.015 in 256 Ki steps).
FINITE_STEP = 1 << 18


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite; float16 by its bits (NumPy's isfinite on float16 is a scalar
    loop: 0.33 s per 131 M values, against 0.05 s for the exponent test)."""
    if values.dtype == np.float16 and values.flags.c_contiguous:
        bits = values.reshape(-1).view(np.uint16)
        tmp = np.empty(min(FINITE_STEP, bits.size), dtype=np.uint16)
        for lo in range(0, bits.size, FINITE_STEP):
            part = np.bitwise_and(bits[lo:lo + FINITE_STEP], 0x7C00, out=tmp[:min(FINITE_STEP, bits.size - lo)])
            if part.max() == 0x7C00:  # an all-ones exponent: inf or NaN
                return False
        return True
    return bool(np.isfinite(values).all())


class BackgroundWriter:
    """Runs ``SettingWriter.add`` in a thread so the forward never waits for zarr.

    The queue is bounded so a slow store applies back-pressure instead of filling RAM.
    An error in the thread is re-raised in the caller at the next ``put`` or ``close``.
    """

    def __init__(self, max_pending: int = 8):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="diffeat-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            writer, rows, values, skipped = item
            try:
                writer.add(rows, values, skipped)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e

    def put(self, writer: SettingWriter, rows: np.ndarray, values: np.ndarray,
            skipped: dict[int, dict] | None = None) -> None:
        """Queue rows for ``writer`` (blocks when the queue is full); ``skipped`` as ``SettingWriter.add``."""
        self._raise()
        self._queue.put((writer, rows, values, skipped))

    def close(self) -> None:
        """Wait until everything queued is written; re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
