"""Where things live in a feature store, what identifies a feature array, and how it is chunked.

The on-disk format (Zarr v3) is specified in ``docs/store-format.md``::

    <root>/                                     group  attrs.diffeat = {"store_format": 1, ...}
      datasets/<dataset>/<split>/<manifest12>/  group  one sample table (attrs: manifest hash, n, ...)
          id     (N,)  string    sample ids, in row order
          path   (N,)  string    image paths relative to the dataset root
          label  (N,)  int64     0-based labels
          class_name (K,) string class names, indexed by label
      features/<model>/<dataset>/<split>/<setting>/   group  one feature setting
          data   (N, C, k, k) float16|float32   dims ("sample", "channel", "y", "x"); attrs.diffeat = provenance
          done   (n_units,) uint8, one chunk per element: 1 once that unit (chunk or shard) is written

``<setting>`` is ``block{b}_t{t}_pool{k}_{hash10}`` (``block{b}_pool{k}_{hash10}`` for a model
without a timestep: a vision backbone) where the hash covers every value-determining setting
(model weights, sample table, block, t, pool, noise, preprocessing, dtypes): same settings ->
same array, reused; any change -> a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from diffeat.errors import StoreError
from diffeat.runtime.checks import check_name as _check_name

#: Precisions a feature array may be stored in (``--store-dtype``).
STORE_DTYPES = ("float16", "float32")

STORE_FORMAT = 1

# Chunking targets (see shared reference zarr_store.md §4.2): chunks always span the whole
# (C, k, k) row; small arrays use ~2 MiB chunks; large ones shard along N.
CHUNK_TARGET_BYTES = 2 << 20
INNER_CHUNK_TARGET_BYTES = 256 << 10
SHARD_TARGET_BYTES = 64 << 20
SHARD_ABOVE_BYTES = 128 << 20


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as one path component of the store, else raise a ``StoreError``.

    Names from users (dataset, split, model, import names) must never escape the
    store root: no separators, no ``..``, no absolute paths, no hidden names, no
    overlong names (``diffeat.runtime.checks.check_name``, the one check of every name).
    """
    return _check_name(name, what, error=StoreError)


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no whitespace: the input of every identity hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def settings_hash(settings: dict) -> str:
    """sha256 (hex) of the canonical JSON of the value-determining settings."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A path-safe slug: letters, digits, '.', '_' and '-' only, never '.' or '..'."""
    return _SLUG.sub("-", text).strip("-.") or "model"


def is_hub_id(spec: str) -> bool:
    """``org/name``: a Hugging Face hub id (when no local path of that name exists)."""
    return "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1


def model_store_name(spec: str) -> str:
    """The name a model's features are stored under, from what ``--model`` was given.

    ``random:<arch>`` -> ``random-<arch>``, a folder -> its name, a hub id ``org/name`` ->
    ``org--name``; anything else (a built-in name, or a stored name such as ``adm256``) is
    returned as it is. So ``cka``/``probe`` options may name a model as ``extract`` was given it.
    """
    from pathlib import Path

    if spec.startswith("random:"):
        return f"random-{safe_name(spec.split(':', 1)[1])}"
    path = Path(spec).expanduser()
    if path.is_dir():
        return safe_name(path.resolve().name)
    if is_hub_id(spec):
        return safe_name(spec.replace("/", "--"))
    return spec


def table_path(dataset: str, split: str, manifest_sha256: str) -> str:
    """Path of a sample table group."""
    return f"datasets/{check_name(dataset, 'dataset')}/{check_name(split, 'split')}/{manifest_sha256[:12]}"


def setting_name(block: int, t: int | None, pool: int, digest: str) -> str:
    """Name of one extracted feature setting's group: ``block24_t90_pool1_<hash10>``; a model without a
    timestep (a vision backbone) has no ``t`` part: ``block3_pool1_<hash10>``."""
    if t is None:
        return f"block{block}_pool{pool}_{digest[:10]}"
    return f"block{block}_t{t}_pool{pool}_{digest[:10]}"


def setting_label(block: int | None, t: int | None, pool: int | None, name: str | None = None) -> str:
    """Short human label of a setting: ``b24/t90/p1``, ``b3/p1`` without a timestep, or the import name."""
    if name is not None:
        return name
    if t is None:
        return f"b{block}/p{pool}"
    return f"b{block}/t{t}/p{pool}"


def setting_path(model: str, dataset: str, split: str, name: str) -> str:
    """Path of a setting's group (the feature array is ``<path>/data``)."""
    parts = [check_name(model, "model"), check_name(dataset, "dataset"), check_name(split, "split"),
             check_name(name, "setting")]
    return "features/" + "/".join(parts)


def _pow2_rows(target_bytes: int, row_bytes: int) -> int:
    rows = max(1, target_bytes // max(1, row_bytes))
    return 1 << (rows.bit_length() - 1)


@dataclass(frozen=True)
class ChunkPlan:
    """How an (N, C, k, k) array is cut: rows per chunk, rows per shard (None: unsharded)."""

    n: int
    chunk_rows: int
    shard_rows: int | None

    @property
    def unit_rows(self) -> int:
        """Rows per unit of work: a whole shard, or a whole chunk when unsharded."""
        return self.shard_rows or self.chunk_rows

    @property
    def n_units(self) -> int:
        """Number of units (the last may be partial)."""
        return -(-self.n // self.unit_rows)

    def unit_range(self, unit: int) -> tuple[int, int]:
        """Rows [lo, hi) of ``unit``."""
        lo = unit * self.unit_rows
        return lo, min(self.n, lo + self.unit_rows)


def plan_chunks(n: int, row_bytes: int, chunk_rows: int | None = None) -> ChunkPlan:
    """Chunk rows along N only; shard when the array is large (work unit = shard).

    ``chunk_rows`` (a power of two) forces unsharded chunks of that many rows: smaller
    units of work, for many concurrent writers on a small dataset.
    """
    if chunk_rows is not None:
        if chunk_rows < 1 or chunk_rows & (chunk_rows - 1):
            raise StoreError(f"--chunk-rows {chunk_rows} is invalid: it must be a power of two >= 1")
        return ChunkPlan(n, chunk_rows, None)
    if n * row_bytes <= SHARD_ABOVE_BYTES:
        rows = min(_pow2_rows(CHUNK_TARGET_BYTES, row_bytes), 1 << max(0, (n - 1).bit_length()))
        return ChunkPlan(n, max(1, rows), None)
    inner = _pow2_rows(INNER_CHUNK_TARGET_BYTES, row_bytes)
    shard = max(inner, _pow2_rows(SHARD_TARGET_BYTES, row_bytes) // inner * inner)
    return ChunkPlan(n, inner, shard)
