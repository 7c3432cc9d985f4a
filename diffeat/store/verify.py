"""``diffeat verify``: read every chunk of a store and check that it says what it holds.

For every feature setting (array) it checks

* **data**: every written unit decodes (the crc32c codec makes a flipped byte fail the
  read) and holds no NaN row (a deleted chunk object reads back as the NaN fill value);
* **ledger**: ``status: complete`` only with every unit flagged; the ledger has one flag
  per unit of the recorded layout, and the layout matches the array's chunking;
* **provenance**: the settings hash recomputes from the recorded settings and matches
  the array's name; the sample table of the recorded manifest exists with as many rows;
  the channel count and pool size match the shape; every setting of one model name
  records the same weights hash; the catalog entry agrees with the array.

It only reads, so read-only access is enough. ``repair=True`` (write access) clears
the ledger flags of damaged units and marks their settings ``in_progress``, so that the
same ``diffeat extract`` command recomputes exactly those units, and rewrites missing or
stale catalog entries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import zarr

from diffeat.errors import StoreError
from diffeat.runtime.progress import Progress
from diffeat.store import catalog
from diffeat.store.fastread import read_rows
from diffeat.store.layout import settings_hash
from diffeat.store.reader import FeatureStore, SettingInfo
from diffeat.store.writer import consolidate

logger = logging.getLogger(__name__)


@dataclass
class UnitDamage:
    """A written unit whose data is not what was written."""

    unit: int
    rows: tuple[int, int]
    problem: str

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {"unit": self.unit, "rows": list(self.rows), "problem": self.problem}


@dataclass
class SettingCheck:
    """What verify found for one setting."""

    path: str
    label: str
    status: str
    n_units: int = 0
    units_written: int = 0
    damaged: list[UnitDamage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # provenance / ledger / catalog
    bytes_read: int = 0
    repaired: bool = False
    settings_hash: str = ""  # set for an orphan catalog entry, whose key it is

    @property
    def ok(self) -> bool:
        """No damaged unit and no problem."""
        return not self.damaged and not self.problems

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {"path": self.path, "label": self.label, "status": self.status, "ok": self.ok,
                "n_units": self.n_units, "units_written": self.units_written,
                "damaged": [d.as_dict() for d in self.damaged], "problems": self.problems,
                "bytes_read": self.bytes_read, "repaired": self.repaired}


@dataclass
class VerifyReport:
    """The result of verifying a store."""

    store: str
    settings: list[SettingCheck]
    seconds: float

    @property
    def ok(self) -> bool:
        """Every checked setting is intact."""
        return all(s.ok for s in self.settings)

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {"store": self.store, "ok": self.ok, "seconds": round(self.seconds, 3),
                "settings": [s.as_dict() for s in self.settings]}


def select(infos: list[SettingInfo], wanted: list[str] | None) -> list[SettingInfo]:
    """Settings matching any of ``wanted`` (array path, setting folder name or hash prefix); all if None."""
    if not wanted:
        return infos
    out = []
    for w in wanted:
        hits = [s for s in infos if w in (s.path, s.path.rsplit("/", 1)[0], s.path.rsplit("/", 2)[-2])
                or (len(w) >= 6 and s.settings_hash.startswith(w))]
        if not hits:
            raise StoreError(f"--setting {w!r} matches no setting of the store (see `diffeat ls --json` for paths)")
        out += [s for s in hits if s not in out]
    return out


def verify(store: FeatureStore, *, settings: list[str] | None = None, repair: bool = False,
           progress: bool | None = None) -> VerifyReport:
    """Check every (or the selected) setting of ``store``; see the module docstring."""
    if repair and store.mode != "a":
        raise StoreError(f"--repair writes to the store: open {store.location} with write access")
    start = time.perf_counter()
    walked = store.list_settings(walk=True)  # the arrays themselves, whatever the catalog says
    entries = {e["path"]: e for e in (catalog.read_catalog(store.objects) or [])}
    infos = select(walked, settings)
    checks = []
    model_hashes: dict[str, set[str]] = {}
    bar = Progress(len(infos), "verify", enabled=progress)
    for info in infos:
        check, model_hash = _check_setting(store, info, entries.get(info.path))
        if model_hash:
            model_hashes.setdefault(info.model, set()).add(model_hash)
        checks.append(check)
        bar.update(1)
    bar.close()
    for check, info in zip(checks, infos, strict=True):
        if len(model_hashes.get(info.model, ())) > 1:
            check.problems.append(f"model name {info.model!r} is recorded with {len(model_hashes[info.model])} "
                                  "different weight hashes in this store")
    for path in sorted(set(entries) - {s.path for s in walked}):
        if not settings:
            checks.append(SettingCheck(path, "catalog entry", "missing",
                                       problems=["catalog entry for an array that does not exist"],
                                       settings_hash=entries[path].get("settings_hash", "")))
    if repair:
        for check in checks:
            _repair(store, check)
        if not settings and not dict(store.root.attrs)["diffeat"].get("catalog"):
            # Every array now has its entry: `ls` may trust the catalog from here on.
            store.root.attrs["diffeat"] = {**dict(store.root.attrs)["diffeat"], "catalog": 1}
    return VerifyReport(store.location, checks, time.perf_counter() - start)


def _check_setting(store: FeatureStore, info: SettingInfo, entry: dict | None) -> tuple[SettingCheck, str | None]:
    array = zarr.open_array(store=store.root.store, path=info.path, mode="r")
    meta = dict(array.attrs).get("diffeat", {})
    check = SettingCheck(info.path, info.label(), meta.get("status", "in_progress"))
    problems = check.problems
    group = info.path.rsplit("/", 1)[0]
    try:
        done = np.asarray(zarr.open_array(store=store.root.store, path=f"{group}/done", mode="r")[:])
    except Exception as e:  # noqa: BLE001 - any failure to read the ledger is reported
        problems.append(f"ledger unreadable: {e}")
        done = np.zeros(0, dtype=np.uint8)
    layout = meta.get("layout", {})
    unit_rows = int(layout.get("unit_rows") or (array.shards or array.chunks)[0])
    n = int(array.shape[0])
    n_units = -(-n // unit_rows)
    check.n_units = n_units
    check.units_written = int(done.astype(bool).sum())
    stored_unit = int((array.shards or array.chunks)[0])
    if stored_unit != unit_rows:
        problems.append(f"layout says {unit_rows} rows per unit, the array is chunked by {stored_unit}")
    if len(done) != n_units:
        problems.append(f"ledger has {len(done)} flags for {n_units} units")
    if check.status == "complete" and not done.all():
        problems.append(f"status is complete but {int((done == 0).sum())} units are not flagged")

    settings = meta.get("settings")
    model_hash = None
    if not isinstance(settings, dict):
        problems.append("no recorded settings (attrs.diffeat.settings)")
    else:
        digest = settings_hash(settings)
        if digest != meta.get("settings_hash"):
            problems.append(f"settings hash {meta.get('settings_hash')} does not match the recorded settings "
                            f"({digest}): the attributes were edited")
        if info.block is not None and not group.endswith(f"_{digest[:10]}"):
            problems.append(f"array folder {group.rsplit('/', 1)[-1]} does not carry the settings hash {digest[:10]}")
        model = settings.get("model")
        model_hash = model.get("weights_sha256") if isinstance(model, dict) else None
        if info.block is not None:
            channels = meta.get("block_info", {}).get("channels")
            if channels is not None and tuple(array.shape[1:]) != (channels, info.pool, info.pool):
                problems.append(f"shape {tuple(array.shape)} does not match block {info.block}'s {channels} "
                                f"channels at pool {info.pool}")
    manifest = meta.get("manifest_sha256")
    try:
        ids, _, _ = store.sample_table(info.dataset, info.split, manifest)
        if len(ids) != n:
            problems.append(f"sample table has {len(ids)} rows, the array {n}")
    except StoreError as e:
        problems.append(f"sample table: {e}")
    if entry is None:
        problems.append("no catalog entry (`diffeat ls` does not show it)")
    elif entry.get("status") != check.status or list(entry.get("shape", [])) != list(array.shape) \
            or entry.get("settings_hash") != meta.get("settings_hash"):
        problems.append(f"catalog entry disagrees with the array (status {entry.get('status')} vs {check.status})")

    for u in range(min(n_units, len(done))):
        if not done[u]:
            continue
        lo, hi = u * unit_rows, min(n, (u + 1) * unit_rows)
        try:
            block = read_rows(array, lo, hi, None)
        except Exception as e:  # noqa: BLE001 - a corrupt chunk can fail in any codec
            check.damaged.append(UnitDamage(u, (lo, hi), f"unreadable: {type(e).__name__}: {e}"))
            continue
        check.bytes_read += block.nbytes
        nan_rows = int(np.isnan(block.reshape(len(block), -1)).any(axis=1).sum())
        if nan_rows:
            check.damaged.append(UnitDamage(u, (lo, hi), f"{nan_rows} rows missing (NaN fill: a chunk object "
                                                         "was deleted?)"))
    if check.damaged:
        logger.warning("%s: %d damaged units", info.path, len(check.damaged))
    return check, model_hash


def _repair(store: FeatureStore, check: SettingCheck) -> None:
    """Unflag damaged units (extract recomputes them) and rewrite the catalog entry."""
    if check.status == "missing":
        store.objects.delete(catalog.entry_key(check.settings_hash))
        return
    array = zarr.open_array(store=store.root.store, path=check.path, mode="r+")
    done = zarr.open_array(store=store.root.store, path=f"{check.path.rsplit('/', 1)[0]}/done", mode="r+")
    meta = dict(array.attrs)["diffeat"]
    if check.damaged:
        group = check.path.rsplit("/", 1)[0]
        for d in check.damaged:
            # A flag is its own object (chunks of one); an absent object reads as 0, the fill value.
            store.objects.delete(f"{group}/done/c/{d.unit}")
        meta["status"] = "in_progress"
        meta.pop("completed", None)
        array.attrs["diffeat"] = meta
        consolidate(store, group)  # xarray's view of the setting says in_progress too
        check.status = "in_progress"
        logger.info("%s: %d units unflagged; run the same `diffeat extract` to recompute them", check.path,
                    len(check.damaged))
    flags = np.asarray(done[:])
    stored = catalog.stored_bytes(store.objects, check.path) if flags.all() else None
    catalog.put_entry(store.objects, catalog.make_entry(check.path, meta, tuple(array.shape), str(array.dtype),
                                                        stored_bytes=stored))
    check.repaired = True
