"""The store's catalog: one small JSON object per feature setting, under ``_catalog/``.

``diffeat ls`` on a remote store lists ``_catalog/`` once and fetches the entries
concurrently, instead of walking the Zarr hierarchy node by node (one request per
group and array). An entry is created when a setting's arrays are created (status
``in_progress``) and replaced when the setting is published (``complete``, with its
stored size). The array's own attributes stay the source of truth: readers re-check
``status`` there before reading, and ``diffeat verify`` compares the two.

Every entry carries a ``checksum``: the sha256 of its canonical JSON without that field. An
entry whose checksum does not match (a flipped byte), or that is not even JSON, is never
trusted: readers list the arrays themselves instead, and ``diffeat verify`` reports it by
its key (``--repair`` rewrites it from the array). Entries written before checksums existed
have none and are checked field by field only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from diffeat.store.layout import canonical_json
from diffeat.store.objects import ObjectStore

logger = logging.getLogger(__name__)

CATALOG = "_catalog"
CATALOG_FORMAT = 1
_HASH = re.compile(r"[0-9a-f]{64}")


def entry_key(settings_hash: str) -> str:
    """Object key of a setting's catalog entry."""
    return f"{CATALOG}/{settings_hash}.json"


def make_entry(data_path: str, meta: dict, shape: tuple[int, ...], dtype: str, *, stored_bytes: int | None = None
               ) -> dict:
    """A catalog entry from a setting's array attributes (``attrs["diffeat"]``)."""
    layout = meta.get("layout", {})
    return {
        "catalog_format": CATALOG_FORMAT,
        "path": data_path,
        "setting": meta.get("setting", {}),
        "settings_hash": meta.get("settings_hash", ""),
        "shape": list(shape),
        "dtype": dtype,
        "status": meta.get("status", "in_progress"),
        "created": meta.get("created", ""),
        "created_by": meta.get("created_by", {}),
        "completed": meta.get("completed"),
        "n_units": layout.get("n_units"),
        "stored_bytes": stored_bytes,
        "model_sha256": _model_sha256(meta.get("settings", {})),
        "manifest_sha256": meta.get("manifest_sha256"),
        "skipped": len(meta.get("skipped") or []),
    }


def checksum(entry: dict) -> str:
    """``sha256:<hex>`` of the entry's canonical JSON, its own ``checksum`` field left out."""
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def entry_problem(entry: object) -> str | None:
    """Why a parsed catalog entry cannot be trusted (a bad checksum, a field of the wrong type), or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if entry.get("catalog_format") != CATALOG_FORMAT:
        return f"catalog_format {entry.get('catalog_format')!r} is not {CATALOG_FORMAT}"
    if "checksum" in entry and entry["checksum"] != checksum(entry):
        return "its checksum does not match its contents (the entry was changed or damaged)"
    setting = entry.get("setting")
    if not isinstance(entry.get("path"), str) or not isinstance(setting, dict):
        return "it has no path or no setting"
    for key in ("model", "dataset", "split"):
        if not isinstance(setting.get(key), str):
            return f"setting.{key} is not a name"
    for key in ("block", "t", "pool"):
        if setting.get(key) is not None and (not isinstance(setting[key], int) or isinstance(setting[key], bool)):
            return f"setting.{key} is not an integer"
    if setting.get("name") is not None and not isinstance(setting["name"], str):
        return "setting.name is not a name"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(v, int) and v >= 0 for v in shape):
        return "shape is not a list of sizes"
    if not isinstance(entry.get("dtype"), str) or entry.get("status") not in ("complete", "in_progress"):
        return "dtype or status is not valid"
    if not isinstance(entry.get("settings_hash"), str) or not _HASH.fullmatch(entry["settings_hash"]):
        return "settings_hash is not a sha256"
    return None


def _model_sha256(settings: dict) -> str | None:
    model = settings.get("model")
    return model.get("weights_sha256") if isinstance(model, dict) else None  # imports name a model only


def stored_bytes(objects: ObjectStore, data_path: str) -> int:
    """Bytes of every object under an array (one listing)."""
    return sum(objects.list(data_path).values())


def create_entry(objects: ObjectStore, entry: dict) -> None:
    """Write the entry of a newly created setting (only if none exists)."""
    objects.create(entry_key(entry["settings_hash"]), _dump(entry))


def put_entry(objects: ObjectStore, entry: dict) -> None:
    """Replace a setting's entry (publish, repair)."""
    objects.put(entry_key(entry["settings_hash"]), _dump(entry))


def read_entries(objects: ObjectStore) -> tuple[dict[str, dict], dict[str, str]]:
    """``({key: entry}, {key: problem})``: the trusted entries and the damaged ones (one listing + reads)."""
    keys = [k for k in objects.list(CATALOG) if k.endswith(".json")]
    good: dict[str, dict] = {}
    bad: dict[str, str] = {}
    for key, data in sorted(objects.get_many(keys).items()):
        try:
            entry = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            bad[key] = f"not JSON ({type(e).__name__})"
            continue
        problem = entry_problem(entry)
        if problem is None and key != entry_key(entry["settings_hash"]):
            problem = f"its settings_hash {entry['settings_hash'][:12]}... is not its key"
        if problem is None:
            good[key] = entry
        else:
            bad[key] = problem
    return good, bad


def read_catalog(objects: ObjectStore) -> list[dict] | None:
    """Every trusted entry, or None when the store has no catalog or any entry is damaged.

    None tells a reader to list the arrays themselves: a damaged entry might be the only
    one of its setting, and a listing that silently left a setting out would mislead.
    """
    good, bad = read_entries(objects)
    if bad:
        key, problem = next(iter(bad.items()))
        logger.warning(
            "catalog entry %s is damaged (%s)%s: listing the arrays instead; `diffeat verify --repair` rewrites it",
            key, problem, f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        return None
    return list(good.values()) if good else None


def _dump(entry: dict) -> bytes:
    entry = json.loads(json.dumps(entry, default=str))  # the types the checksum will be read back with
    entry["checksum"] = checksum(entry)
    return json.dumps(entry, indent=1, sort_keys=True).encode()
