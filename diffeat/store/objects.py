"""Small objects next to the Zarr arrays: claims, catalog entries, write checks.

Zarr reads and writes chunks; the coordination objects of a shared store need two
more things that Zarr does not give: an *exclusive create* (exactly one of several
writers succeeds) and a cheap *listing* of a prefix. ``ObjectStore`` provides both for a
local directory (a hard link of a complete temp file: atomic, and never half-visible)
and for any fsspec filesystem that supports ``pipe_file(mode="create")`` (S3 conditional
put with ``If-None-Match: *``; moto and AWS both honour it).

Keys are ``/``-separated paths relative to the store root; they are built by diffeat
from validated names (``layout.check_name``), never taken from users as is.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from diffeat.errors import StoreError


def _local_path(location: str) -> Path | None:
    if "://" not in location:
        return Path(location).expanduser().absolute()
    if location.startswith("file://"):
        return Path(location[len("file://"):]).expanduser().absolute()
    return None


class ObjectStore:
    """Byte objects under a store root, with exclusive create and prefix listing."""

    def __init__(self, location: str, storage_options: dict | None = None):
        self.location = location
        self._local = _local_path(location)
        if self._local is None:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(location, **(storage_options or {}))
            self.root = self.root.rstrip("/")

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"object key {key!r} would leave the store root")
        return str(self._local / key) if self._local is not None else f"{self.root}/{key}"

    # -- writes ---------------------------------------------------------------------------------
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; True if this call created it."""
        path = self._path(key)
        if self._local is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # fails if it exists: atomic, and the content is complete
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    def put(self, key: str, data: bytes) -> None:
        """Write (or replace) ``key`` atomically: readers see the old or the new bytes."""
        path = self._path(key)
        if self._local is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        self.fs.pipe_file(path, data)

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        path = self._path(key)
        try:
            if self._local is not None:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # -- reads ----------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The bytes of ``key``, or None if it does not exist."""
        path = self._path(key)
        try:
            if self._local is not None:
                return Path(path).read_bytes()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Bytes of several keys (missing ones left out); concurrent requests on remote stores."""
        if not keys:
            return {}
        if self._local is not None:
            out = {}
            for k in keys:
                data = self.get(k)
                if data is not None:
                    out[k] = data
            return out
        paths = {self._path(k): k for k in keys}
        got = self.fs.cat(list(paths), on_error="omit")
        return {paths[p if p in paths else p.split("://", 1)[-1]]: v for p, v in got.items()}

    def list(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` of every object under ``prefix`` (recursive; one listing on S3)."""
        base = self._path(prefix.rstrip("/"))
        out: dict[str, int] = {}
        if self._local is not None:
            if not os.path.isdir(base):
                return out
            for dirpath, _, files in os.walk(base):
                for name in files:
                    if name.endswith(".tmp"):
                        continue  # a create or put in flight
                    full = os.path.join(dirpath, name)
                    out[os.path.relpath(full, self._local).replace(os.sep, "/")] = os.path.getsize(full)
            return out
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return out
        root = self.root + "/"
        for path, info in found.items():
            if path.startswith(root):
                out[path[len(root):]] = int(info.get("size") or 0)
        return out

    # -- JSON helpers ---------------------------------------------------------------------------
    def get_json(self, key: str) -> dict | None:
        """A JSON object, or None if missing or unreadable (a torn or foreign object)."""
        data = self.get(key)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def check_writable(self) -> None:
        """Create and delete a probe object; a ``StoreError`` saying so if writes are refused."""
        key = f"_writetest/{uuid.uuid4().hex}"
        try:
            self.put(key, b"diffeat write test")
            self.delete(key)
        except (PermissionError, OSError) as e:
            raise StoreError(
                f"feature store {self.location} is not writable ({type(e).__name__}: {e}): extract needs write "
                "access; probe, cka, ls and verify work read-only"
            ) from e
