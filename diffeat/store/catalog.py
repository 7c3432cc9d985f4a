"""The store's catalog: one small JSON object per feature setting, under ``_catalog/``.

``diffeat ls`` on a remote store lists ``_catalog/`` once and fetches the entries
concurrently, instead of walking the Zarr hierarchy node by node (one request per
group and array). An entry is created when a setting's arrays are created (status
``in_progress``) and replaced when the setting is published (``complete``, with its
stored size). The array's own attributes stay the source of truth: readers re-check
``status`` there before reading, and ``diffeat verify`` compares the two.
"""

from __future__ import annotations

import json

from diffeat.store.objects import ObjectStore

CATALOG = "_catalog"
CATALOG_FORMAT = 1


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
    }


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


def read_catalog(objects: ObjectStore) -> list[dict] | None:
    """Every entry (one listing + concurrent reads), or None when the store has no catalog."""
    keys = [k for k in objects.list(CATALOG) if k.endswith(".json")]
    if not keys:
        return None
    out = []
    for _key, data in sorted(objects.get_many(keys).items()):
        try:
            entry = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            continue  # a foreign or torn object: verify reports it
        if isinstance(entry, dict) and entry.get("catalog_format") == CATALOG_FORMAT and "path" in entry:
            out.append(entry)
    return out


def _dump(entry: dict) -> bytes:
    return json.dumps(entry, indent=1, sort_keys=True, default=str).encode()
