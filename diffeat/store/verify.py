"""``diffeat verify``: read every object of a store and check that it says what it holds.

It starts from one listing of the store's objects, not from the Zarr hierarchy, so damaged
metadata anywhere is reported (with its path) instead of ending the run. For every feature
setting (array) it checks

* **data**: every written unit decodes (the crc32c codec makes a flipped byte fail the
  read) and holds no NaN row that is not a recorded skipped image (a deleted chunk object
  reads back as the NaN fill value);
* **ledger**: every flag reads back (flags are checksummed too); ``status: complete`` only
  with every unit flagged; one flag per unit of the recorded layout, and the layout
  matches the array's chunking;
* **identity and provenance** (``diffeat.store.integrity``): the settings hash recomputes
  from the recorded settings and is carried by the folder name; ``setting`` agrees with the
  settings; shape and dtype agree with the block and the store dtype; the sample table of
  the recorded manifest exists with as many rows; every setting of one model name records
  the same weights hash; the catalog entry is intact (its checksum) and says what the
  array's attributes say; the skipped rows recorded match the per-unit skip records.

and for the rest of the store: the root and every group's metadata parse; every sample
table reads back and its rows hash to its manifest; every catalog entry is intact and
belongs to an array; no claim is left on a finished setting or table.

It only reads, so read-only access is enough. ``repair=True`` (write access) rebuilds what
can be rebuilt from what is intact: the ledger flags of units whose data reads back whole
(a deleted or damaged ledger of a complete setting needs no recomputation), group metadata,
the root's, catalog entries; it clears the flags of damaged units and marks their settings
``in_progress``, so that the same ``diffeat extract`` recomputes exactly those units; it
removes damaged sample tables (extract writes them again), orphan catalog entries and
claims left on finished work.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from diffeat.errors import StoreError, first_line
from diffeat.runtime.progress import Progress
from diffeat.store import catalog
from diffeat.store.fastread import read_rows, rows_of
from diffeat.store.integrity import entry_problems, setting_problems, table_problems
from diffeat.store.layout import STORE_FORMAT
from diffeat.store.reader import FeatureStore
from diffeat.store.writer import SKIPPED, consolidate, create_ledger, read_skips

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
    problems: list[str] = field(default_factory=list)  # identity / ledger / catalog
    bytes_read: int = 0
    repaired: bool = False
    settings_hash: str = ""  # set for an orphan catalog entry, whose key it is
    unflagged_ok: list[int] = field(default_factory=list)  # units without a readable flag whose data is whole
    lost_flags: list[int] = field(default_factory=list)  # units whose flag object is damaged
    readable: bool = True  # False: the array's metadata cannot be read at all

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
class ObjectProblem:
    """Something wrong outside a setting's arrays: metadata, a sample table, a catalog entry, claims."""

    path: str
    problem: str
    repaired: bool = False

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {"path": self.path, "problem": self.problem, "repaired": self.repaired}


@dataclass
class VerifyReport:
    """The result of verifying a store."""

    store: str
    settings: list[SettingCheck]
    seconds: float
    objects: list[ObjectProblem] = field(default_factory=list)
    objects_checked: int = 0

    @property
    def ok(self) -> bool:
        """Every checked setting and object is intact."""
        return all(s.ok for s in self.settings) and not self.objects

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {"store": self.store, "ok": self.ok, "seconds": round(self.seconds, 3),
                "objects_checked": self.objects_checked, "settings": [s.as_dict() for s in self.settings],
                "objects": [p.as_dict() for p in self.objects]}


def select(paths: list[str], hashes: dict[str, str], wanted: list[str] | None) -> list[str]:
    """Array paths matching any of ``wanted`` (array path, setting folder name or hash prefix); all if None."""
    if not wanted:
        return paths
    out: list[str] = []
    for w in wanted:
        hits = [p for p in paths if w in (p, p.rsplit("/", 1)[0], p.rsplit("/", 2)[-2])
                or (len(w) >= 6 and hashes.get(p, "").startswith(w))]
        if not hits:
            raise StoreError(f"--setting {w!r} matches no setting of the store (see `diffeat ls --json` for paths)")
        out += [p for p in hits if p not in out]
    return out


def verify(store: FeatureStore, *, settings: list[str] | None = None, repair: bool = False,
           progress: bool | None = None) -> VerifyReport:
    """Check every (or the selected) setting of ``store`` and the objects around them; see the module docstring."""
    if repair and store.mode != "a":
        raise StoreError(f"--repair writes to the store: open {store.location} with write access")
    start = time.perf_counter()
    keys = store.objects.list("")
    problems: list[ObjectProblem] = []
    metadata = _read_metadata(store, keys, problems)
    paths = sorted(k[: -len("/zarr.json")] for k in keys if k.startswith("features/") and k.endswith("/data/zarr.json"))
    good_entries, bad_entries = catalog.read_entries(store.objects)
    hashes = {p: _folder_hash(metadata.get(f"{p}/zarr.json")) for p in paths}
    selected = select(paths, hashes, settings)
    skip_keys: dict[str, list[str]] = {}  # settings hash -> its skip records (one pass over the listing)
    for key in keys:
        if key.startswith(f"{SKIPPED}/") and key.count("/") == 2:
            skip_keys.setdefault(key.split("/")[1], []).append(key)
    checks: list[SettingCheck] = []
    model_hashes: dict[str, set[str]] = {}
    bar = Progress(len(selected), "verify", enabled=progress)
    for path in selected:
        check, model, model_hash = _check_setting(store, path, good_entries, keys, skip_keys)
        if model_hash:
            model_hashes.setdefault(model, set()).add(model_hash)
        checks.append(check)
        bar.update(1)
    bar.close()
    for check in checks:
        model = check.path.split("/")[1]
        if len(model_hashes.get(model, ())) > 1:
            check.problems.append(f"model name {model!r} is recorded with {len(model_hashes[model])} different "
                                  "weight hashes in this store")
    if not settings:
        _check_tables(store, keys, problems)
        for key, problem in bad_entries.items():
            problems.append(ObjectProblem(key, f"catalog entry damaged: {problem}"))
        known = {c.settings_hash for c in checks if c.settings_hash}
        for key, entry in good_entries.items():
            if entry["settings_hash"] not in known and entry["path"] not in paths:
                problems.append(ObjectProblem(key, f"catalog entry for an array that does not exist ({entry['path']})"))
        _check_claims(keys, checks, problems)
    if repair:
        _repair(store, checks, problems, metadata, bad_entries, good_entries, whole_store=not settings)
    return VerifyReport(store.location, checks, time.perf_counter() - start, problems, len(keys))


def _folder_hash(meta: Any) -> str:
    """The settings hash recorded in an array's metadata document (for --setting HASH), or ''."""
    try:
        return str(meta["attributes"]["diffeat"]["settings_hash"])
    except (KeyError, TypeError):
        return ""


# -- metadata ---------------------------------------------------------------------------------------

def _read_metadata(store: FeatureStore, keys: dict[str, int], problems: list[ObjectProblem]) -> dict[str, Any]:
    """Every ``zarr.json`` parsed (damaged ones reported); ``{key: document}`` of those that parse."""
    meta_keys = sorted(k for k in keys if k == "zarr.json" or k.endswith("/zarr.json"))
    out: dict[str, Any] = {}
    if store.root_problem is not None:
        problems.append(ObjectProblem("zarr.json", store.root_problem))
    for key, data in store.objects.get_many(meta_keys).items():
        try:
            doc = json.loads(data)
            kind = doc.get("node_type") if isinstance(doc, dict) else None
            if kind == "group":
                from zarr.core.group import GroupMetadata

                GroupMetadata.from_dict(dict(doc))
            elif kind == "array":
                from zarr.core.metadata import ArrayV3Metadata

                ArrayV3Metadata.from_dict(dict(doc))
            else:
                raise ValueError(f"node_type {kind!r}")
        except Exception as e:  # noqa: BLE001 - json, zarr and numpy all raise on damaged metadata
            if key != "zarr.json" or store.root_problem is None:
                problems.append(ObjectProblem(key, f"metadata unreadable ({type(e).__name__}: {first_line(e, 200)})"))
            continue
        out[key] = doc
    for key, doc in out.items():
        members = (doc.get("consolidated_metadata") or {}).get("metadata") if doc.get("node_type") == "group" else None
        folder = key[: -len("zarr.json")]
        for name, member in (members or {}).items():
            own = out.get(f"{folder}{name}/zarr.json")
            if own != member and not _same_array_metadata(own, member):
                # diffeat never reads this copy, but xarray does: a stale or damaged one misleads it.
                problems.append(ObjectProblem(key, f"consolidated metadata of {name!r} differs from "
                                                   f"{folder}{name}/zarr.json"))
    root = out.get("zarr.json")
    if root is not None and store.root_problem is None:
        attrs = (root.get("attributes") or {}).get("diffeat")
        if not isinstance(attrs, dict) or attrs.get("store_format") != STORE_FORMAT or \
                attrs.get("catalog") not in (None, 1):
            problems.append(ObjectProblem("zarr.json", f"root attributes {attrs!r} are not a format "
                                                       f"{STORE_FORMAT} feature store's"))
    return out


def _same_array_metadata(a: Any, b: Any) -> bool:
    from zarr.core.metadata import ArrayV3Metadata

    try:
        return ArrayV3Metadata.from_dict(dict(a)).to_dict() == ArrayV3Metadata.from_dict(dict(b)).to_dict()
    except Exception:  # noqa: BLE001 - either one unparseable: not the same
        return False


# -- settings ---------------------------------------------------------------------------------------

def _check_setting(store: FeatureStore, path: str, entries: dict[str, dict], keys: dict[str, int],
                   skip_keys: dict[str, list[str]]) -> tuple[SettingCheck, str, str | None]:
    """One setting's check, its model name and its recorded weights hash."""
    group = path.rsplit("/", 1)[0]
    label = group.rsplit("/", 1)[-1]
    try:
        array = store.open_array(path)
        meta = dict(array.attrs).get("diffeat")
    except StoreError as e:
        if "metadata" not in str(e):
            raise
        return SettingCheck(path, label, "unreadable", problems=[f"array metadata unreadable: {e}"],
                            readable=False), path.split("/")[1], None
    status = meta.get("status", "?") if isinstance(meta, dict) else "?"
    check = SettingCheck(path, label, str(status))
    check.problems += setting_problems(path, meta, tuple(array.shape), str(array.dtype))
    meta = meta if isinstance(meta, dict) else {}
    check.settings_hash = str(meta.get("settings_hash", ""))
    n = int(array.shape[0])
    unit_rows = int((array.shards or array.chunks)[0])
    n_units = -(-n // unit_rows)
    check.n_units = n_units
    layout = meta.get("layout") if isinstance(meta.get("layout"), dict) else {}
    if layout.get("unit_rows") != unit_rows or layout.get("n_units") != n_units:
        check.problems.append(f"layout says {layout.get('unit_rows')} rows x {layout.get('n_units')} units, the array "
                              f"is chunked by {unit_rows} rows ({n_units} units)")
    flags = _read_flags(store, group, n_units, check, keys)
    check.units_written = int(np.count_nonzero(flags == 1))
    if check.status == "complete" and not (flags == 1).all():
        check.problems.append(f"status is complete but {int((flags != 1).sum())} units are not flagged")

    skips = _unit_skips(store, skip_keys.get(check.settings_hash, []), check)
    recorded = meta.get("skipped") or []
    if check.status == "complete" and _skip_rows(recorded) != sorted(r for rows in skips.values() for r in rows):
        check.problems.append(f"attrs.skipped lists {len(recorded)} rows, the skip records of its units "
                              f"{sum(len(r) for r in skips.values())}")
    manifest = meta.get("manifest_sha256")
    setting = meta.get("setting") if isinstance(meta.get("setting"), dict) else {}
    try:
        ids, _, _ = store.sample_table(str(setting.get("dataset")), str(setting.get("split")), manifest)
        if len(ids) != n:
            check.problems.append(f"sample table has {len(ids)} rows, the array {n}")
    except StoreError as e:
        check.problems.append(f"sample table: {e}")
        ids = None
    if f"{group}/sample/zarr.json" in keys:  # the `sample` coordinate xarray reads (since diffeat 0.1.1)
        try:
            coordinate = np.array(store.open_array(f"{group}/sample")[:].tolist(), dtype=str)
            if ids is not None and not np.array_equal(coordinate, ids):
                check.problems.append(f"{group}/sample: the sample coordinate is not the sample table's ids")
        except Exception as e:  # noqa: BLE001 - a damaged chunk or metadata of the coordinate
            check.problems.append(f"{group}/sample unreadable ({type(e).__name__}: {first_line(e, 200)})")
    key = catalog.entry_key(check.settings_hash) if check.settings_hash else ""
    entry = entries.get(key)
    if entry is None:
        if key not in keys:
            check.problems.append("no catalog entry (`diffeat ls` does not show it)")
    else:
        expected = catalog.make_entry(path, meta, tuple(array.shape), str(array.dtype))
        check.problems += [f"{key}: {p}" for p in entry_problems(entry, expected)]

    for u in range(n_units):
        lo, hi = u * unit_rows, min(n, (u + 1) * unit_rows)
        if flags[u] == 0 and check.status != "complete":
            continue  # not written yet (or unflagged for recomputation): nothing to read
        problem, nbytes = _unit_problem(array, lo, hi, skips.get(u, []))
        check.bytes_read += nbytes
        if flags[u] == 1:
            if problem:
                check.damaged.append(UnitDamage(u, (lo, hi), problem))
        elif problem is None:
            # A lost flag (damaged, or deleted from a complete setting) whose unit reads back whole:
            # repair sets it again instead of recomputing the unit.
            check.unflagged_ok.append(u)
    if check.damaged:
        logger.warning("%s: %d damaged units", path, len(check.damaged))
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    model = settings.get("model")
    return check, path.split("/")[1], model.get("weights_sha256") if isinstance(model, dict) else None


def _read_flags(store: FeatureStore, group: str, n_units: int, check: SettingCheck, keys: dict[str, int]
                ) -> np.ndarray:
    """The ledger as 0/1 per unit; flags that cannot be read are -1 (and reported)."""
    flags = np.zeros(n_units, dtype=np.int8)
    if f"{group}/done/zarr.json" not in keys:
        check.problems.append("ledger missing (done/zarr.json)")
        check.lost_flags = list(range(n_units))
        return flags - 1
    try:
        done = store.open_array(f"{group}/done")
        if done.shape != (n_units,):
            check.problems.append(f"ledger has {done.shape[0] if done.ndim else 0} flags for {n_units} units")
        values = np.asarray(done[:])
        flags[: min(n_units, len(values))] = (values[:n_units] != 0).astype(np.int8)
        return flags
    except Exception as e:  # noqa: BLE001 - find the damaged flags one by one
        if "metadata" in str(e):
            check.problems.append(f"ledger unreadable: {first_line(e, 200)}")
            check.lost_flags = list(range(n_units))
            return flags - 1
    for u in range(n_units):
        try:
            flags[u] = 1 if done[u] else 0
        except Exception as e:  # noqa: BLE001 - a flag object failing its checksum
            flags[u] = -1
            check.lost_flags.append(u)
            check.problems.append(f"ledger flag of unit {u} unreadable ({type(e).__name__})")
    return flags


def _unit_skips(store: FeatureStore, keys: list[str], check: SettingCheck) -> dict[int, list[int]]:
    """``{unit: [rows]}`` from the setting's skip records ``keys`` (a damaged record is reported)."""
    out: dict[int, list[int]] = {}
    for key, data in store.objects.get_many(keys).items():
        try:
            record = json.loads(data)
            out[int(record["unit"])] = sorted(int(r["row"]) for r in record["rows"])
        except Exception as e:  # noqa: BLE001 - a damaged skip record
            check.problems.append(f"skip record {key} unreadable ({type(e).__name__})")
    return out


def _skip_rows(records: Any) -> list[int]:
    try:
        return sorted(int(r["row"]) for r in records)
    except (TypeError, KeyError, ValueError):
        return [-1]


def _unit_problem(array: zarr.Array, lo: int, hi: int, skipped: list[int]) -> tuple[str | None, int]:
    """Why rows [lo, hi) do not read back whole (None: they do), and the bytes read."""
    nan_rows: list[tuple[int, int]] = []
    try:
        block = read_rows(array, lo, hi, None, nan_rows=nan_rows)
    except Exception as e:  # noqa: BLE001 - a corrupt chunk can fail in any codec
        return f"unreadable: {type(e).__name__}: {first_line(e, 200)}", 0
    flat = block.reshape(len(block), -1)
    # Rows no stored chunk holds, and skipped rows written as NaN (writers store finite values only).
    missing = set(rows_of(nan_rows).tolist())
    missing |= {r for r in skipped if lo <= r < hi and flat.size and np.isnan(flat[r - lo]).any()}
    unexplained = missing - set(skipped)
    if unexplained:
        return f"{len(unexplained)} rows missing (NaN fill: a chunk object was deleted?)", block.nbytes
    if set(skipped) - missing:
        return f"{len(set(skipped) - missing)} rows recorded as skipped hold values", block.nbytes
    return None, block.nbytes


# -- sample tables, claims ------------------------------------------------------------------------------

def _check_tables(store: FeatureStore, keys: dict[str, int], problems: list[ObjectProblem]) -> None:
    """Every sample table reads back (checksummed chunks) and its rows hash to its manifest."""
    for key in sorted(k for k in keys if k.startswith("datasets/") and k.count("/") == 4 and k.endswith("/zarr.json")):
        path = key[: -len("/zarr.json")]
        columns = []
        where = path
        try:
            group = zarr.open_group(store=store.zarr_store, path=path, mode="r")
            attrs = dict(group.attrs).get("diffeat")
            for name in ("id", "path", "label", "class_name"):
                where = f"{path}/{name}"
                columns.append(store.open_array(where)[:])
        except Exception as e:  # noqa: BLE001 - a damaged chunk or metadata of the table
            problems.append(ObjectProblem(where, f"sample table unreadable ({type(e).__name__}: {first_line(e, 200)})"))
            continue
        ids, relpaths, labels, names = columns
        found = table_problems(path, attrs, [str(v) for v in ids], [str(v) for v in relpaths], labels,
                               [str(v) for v in names])
        problems += [ObjectProblem(path, f"sample table: {p}") for p in found]
        if f"{path}/sample/zarr.json" in keys:  # the `sample` coordinate xarray reads (since diffeat 0.1.1)
            try:
                if [str(v) for v in store.open_array(f"{path}/sample")[:]] != [str(v) for v in ids]:
                    problems.append(ObjectProblem(f"{path}/sample", "the sample coordinate is not the table's ids"))
            except Exception as e:  # noqa: BLE001 - a damaged chunk or metadata of the coordinate
                problems.append(ObjectProblem(f"{path}/sample", f"sample coordinate unreadable ({type(e).__name__}: "
                                                                f"{first_line(e, 200)})"))


def _check_claims(keys: dict[str, int], checks: list[SettingCheck], problems: list[ObjectProblem]) -> None:
    """Claims left on finished settings (a killed writer's, after its last flag) are reported."""
    complete = {c.settings_hash for c in checks if c.status == "complete" and c.ok}
    left: dict[str, int] = {}
    for key in keys:
        parts = key.split("/")
        if parts[0] == "_claims" and len(parts) == 3 and parts[1] in complete:
            left[parts[1]] = left.get(parts[1], 0) + 1
    for digest, count in sorted(left.items()):
        problems.append(ObjectProblem(f"_claims/{digest}", f"{count} claim objects left on a finished setting"))


# -- repair ---------------------------------------------------------------------------------------------

def _repair(store: FeatureStore, checks: list[SettingCheck], problems: list[ObjectProblem], metadata: dict,
            bad_entries: dict[str, str], good_entries: dict[str, dict], *, whole_store: bool) -> None:
    """Rebuild what can be rebuilt, unflag what must be recomputed, remove what is left over."""
    consolidated: set[str] = set()  # groups whose consolidated metadata is written again at the end
    for problem in problems:
        path = problem.path
        if path.endswith("zarr.json") and problem.problem.startswith("consolidated metadata"):
            consolidated.add(path[: -len("zarr.json")].rstrip("/"))
            problem.repaired = True
        elif path.endswith("zarr.json"):
            problem.repaired = _rewrite_group(store, path)
            parts = path.split("/")
            if problem.repaired and len(parts) == 6 and parts[0] == "features":
                consolidated.add(path[: -len("/zarr.json")])  # a setting group: xarray's copy too
        elif path.startswith("datasets/"):
            path = "/".join(path.split("/")[:4])  # the whole table: the next extract writes it again
            for key in store.objects.list(path):
                store.objects.delete(key)  # the next extract of this split writes the table again
            problem.repaired = True
        elif path.startswith(catalog.CATALOG) and path not in bad_entries:
            store.objects.delete(path)  # an orphan entry
            problem.repaired = True
        elif path.startswith("_claims/"):
            for key in store.objects.list(path):
                store.objects.delete(key)
            problem.repaired = True
    for check in checks:
        if check.readable:
            _repair_setting(store, check)
    for key in bad_entries:
        if not any(c.repaired and catalog.entry_key(c.settings_hash) == key for c in checks):
            store.objects.delete(key)  # a damaged entry of no readable array
    for group in sorted(consolidated - {c.path.rsplit("/", 1)[0] for c in checks if c.repaired}):
        try:
            consolidate(store, group)
        except Exception as e:  # noqa: BLE001 - a member's own metadata is damaged: nothing to copy from
            logger.warning("%s: consolidated metadata not rewritten (%s)", group, first_line(e, 200))
            for problem in problems:
                if problem.path == f"{group}/zarr.json":
                    problem.repaired = False
    if whole_store and all(c.readable for c in checks):
        root = zarr.open_group(store=store.zarr_store, mode="r+")
        attrs = dict(root.attrs).get("diffeat")
        if not isinstance(attrs, dict) or attrs.get("catalog") != 1:
            # Every array now has its entry: `ls` may trust the catalog from here on.
            root.attrs["diffeat"] = {"store_format": STORE_FORMAT, "catalog": 1}


def _rewrite_group(store: FeatureStore, key: str) -> bool:
    """Write a damaged group's metadata again (groups of a store hold no attributes but the root's)."""
    path = key[: -len("zarr.json")].rstrip("/")
    parts = path.split("/") if path else []
    plain = not parts or (parts[0] == "features" and len(parts) <= 5) or (parts[0] == "datasets" and len(parts) <= 3)
    if not plain:
        return False  # an array's or a sample table's metadata: handled with its setting or table
    attrs = {"diffeat": {"store_format": STORE_FORMAT, "catalog": 1}} if not path else {}
    doc = {"attributes": attrs, "zarr_format": 3, "node_type": "group"}
    store.objects.put(key, json.dumps(doc, indent=2).encode())
    if not path:
        store.root = zarr.open_group(store=store.zarr_store, mode="r+")
        store.root_problem = None
    return True


def _repair_setting(store: FeatureStore, check: SettingCheck) -> None:
    """Rebuild a setting's lost flags, unflag its damaged units, rewrite its catalog entry."""
    group = check.path.rsplit("/", 1)[0]
    array = store.open_array(check.path, mode="r+")
    meta = dict(array.attrs)["diffeat"]
    from diffeat.store.layout import ChunkPlan

    unit_rows = int((array.shards or array.chunks)[0])
    plan = ChunkPlan(int(array.shape[0]), int(array.chunks[0]), unit_rows if array.shards else None)
    if store.objects.get(f"{group}/done/zarr.json") is None or any("ledger unreadable" in p for p in check.problems):
        create_ledger(store, group, plan)  # rebuilt from the data below
        check.lost_flags = list(range(plan.n_units))
    done = store.open_array(f"{group}/done", mode="r+")
    for u in check.lost_flags:
        store.objects.delete(f"{group}/done/c/{u}")  # absent reads as 0, the fill value
    for u in check.unflagged_ok:
        done[u] = 1  # the unit reads back whole: its flag was lost (or deleted from a complete setting), not its data
    for d in check.damaged:
        # A flag is its own object (chunks of one); an absent object reads as 0, the fill value.
        store.objects.delete(f"{group}/done/c/{d.unit}")
    flags = np.asarray(done[:])
    complete = bool(flags.all())
    if not complete and meta.get("status") == "complete":
        meta["status"] = "in_progress"
        meta.pop("completed", None)
        array.attrs["diffeat"] = meta
        logger.info("%s: %d units unflagged; run the same `diffeat extract` to recompute them", check.path,
                    int((flags == 0).sum()))
    check.status = meta.get("status", "in_progress")
    stored = catalog.stored_bytes(store.objects, check.path) if complete else None
    catalog.put_entry(store.objects, catalog.make_entry(check.path, meta, tuple(array.shape), str(array.dtype),
                                                        stored_bytes=stored))
    if complete:
        # Published: the skip records are folded into the attributes, claims are no longer needed.
        meta_skips = read_skips(store.objects, str(meta.get("settings_hash", "")))
        if meta_skips != (meta.get("skipped") or []):
            meta["skipped"] = meta_skips
            if not meta_skips:
                meta.pop("skipped")
            array.attrs["diffeat"] = meta
            catalog.put_entry(store.objects, catalog.make_entry(check.path, meta, tuple(array.shape),
                                                                str(array.dtype), stored_bytes=stored))
    consolidate(store, group)  # xarray's view of the setting (its status, its ledger) follows the arrays
    check.repaired = True
