"""Small objects next to the Zarr arrays: claims, catalog entries, write checks.

Zarr reads and writes chunks; the coordination objects of a shared store need two
more things that Zarr does not give: an *exclusive create* (exactly one of several
writers succeeds) and a cheap *listing* of a prefix. ``ObjectStore`` provides both for a
local directory (a hard link of a complete temp file: atomic, and never half-visible)
and for any fsspec filesystem that supports ``pipe_file(mode="create")`` (S3 conditional
put with ``If-None-Match: *``; moto and AWS both honour it).

Keys are ``/``-separated paths relative to the store root; they are built by diffeat
from validated names (``layout.check_name``), never taken from users as is.

Remote stores (any fsspec URL: ``s3://``, ``gs://`` ...) are also read and written by zarr
through ``RemoteZarrStore``. Both it and ``ObjectStore`` turn errors of access (denied, no
credentials, unreachable endpoint, missing bucket) into one-line ``StoreError``s naming the
store (``remote_error``), and never cache listings (``remote_options``): other writers add
objects while a process runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from zarr.storage import FsspecStore

from diffeat.errors import StoreError, first_line
from diffeat.store.location import bucket, is_url, local_path, protocol

#: fsspec protocols whose first path component is a bucket (or container).
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})

#: exception class names (anywhere in the MRO) of remote filesystems, matched by name so that
#: botocore, aiohttp, google-auth ... need not be imported to recognise them.
_CREDENTIAL_ERRORS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                                "NoAuthTokenError", "DefaultCredentialsError", "RefreshError"})
_CONNECTION_ERRORS = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                                "ReadTimeoutError", "ProxyConnectionError", "ClientConnectorError",
                                "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
                                "ConnectionError", "TimeoutError", "gaierror"})
_MISSING_OK = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def remote_options(location: str, storage_options: dict | None) -> dict:
    """fsspec options for a store at ``location``: the user's, plus no listings cache on object stores.

    Other writers add objects (units, claims, catalog entries) while a process runs; a cached
    listing would hide them, so object-store listings always go to the server.
    """
    opts = dict(storage_options or {})
    if protocol(location) in BUCKET_PROTOCOLS:
        opts.setdefault("use_listings_cache", False)
    return opts




def remote_error(location: str, e: BaseException, *, writing: bool) -> StoreError | None:
    """A one-line ``StoreError`` naming ``location`` for an error of a remote store, or None.

    None for errors that are not about access (a missing key is for the caller to handle).
    Access denied, missing credentials, an unreachable endpoint, a missing bucket and any
    other error the filesystem reports (``OSError``) are translated.
    """
    if isinstance(e, StoreError):
        return e
    names = {c.__name__ for c in type(e).__mro__}
    why = first_line(e)
    if names & _CREDENTIAL_ERRORS:
        return StoreError(
            f"no credentials for feature store {location} ({why}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass --storage-options '{\"key\": ..., \"secret\": ...}' "
            "('{\"anon\": true}' for a public bucket)"
        )
    if isinstance(e, PermissionError):
        if writing:
            return StoreError(
                f"feature store {location} is not writable with these credentials ({why}): extract and import "
                "need write access; probe, cka, ls and verify work read-only"
            )
        return StoreError(f"access denied reading feature store {location} ({why}): check the credentials "
                          "(AWS_ACCESS_KEY_ID / AWS_PROFILE, or --storage-options)")
    if names & _CONNECTION_ERRORS:
        return StoreError(
            f"cannot reach the object store of {location} ({type(e).__name__}: {why}): check the endpoint "
            "(AWS_ENDPOINT_URL, or --storage-options '{\"client_kwargs\": {\"endpoint_url\": ...}}') and the network"
        )
    if isinstance(e, FileNotFoundError) and "bucket" in why.lower():
        return StoreError(f"feature store {location}: {missing_bucket(location)}")
    if isinstance(e, _MISSING_OK):
        return None
    if isinstance(e, OSError) or "ClientError" in names or "BotoCoreError" in names:
        return StoreError(f"feature store {location}: the object store refused a "
                          f"{'write' if writing else 'read'} ({type(e).__name__}: {why})")
    return None


def missing_bucket(location: str) -> str:
    """The sentence for a missing bucket: which one, and what to check."""
    return (f"bucket {bucket(location)!r} does not exist (or is not visible with these credentials or this endpoint)")


def reraise_remote(location: str, e: BaseException, *, writing: bool):
    """Raise ``remote_error(...)`` for ``e`` if it is one, else ``e`` itself (call in an ``except``)."""
    err = remote_error(location, e, writing=writing)
    if err is None or err is e:
        raise e
    raise err from e


#: errno values that mean the disk (or the user's quota) is full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_error(location: str, e: BaseException) -> StoreError | None:
    """A one-line ``StoreError`` for a full disk or quota while writing ``location``, else None."""
    if not isinstance(e, OSError) or e.errno not in DISK_FULL:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return StoreError(f"no space left writing feature store {location}{where}: {e.strerror}; free space (or raise "
                      "the quota) and run the same command again: finished units are kept and it resumes")


def _complete_temp_file(path: str, data: bytes) -> str:
    """Write ``data`` to a fresh temp file beside ``path`` (``.tmp``: listings skip it); return its path.

    A failed write (a full disk) removes its temp file: nothing half-written is left behind.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


class ObjectStore:
    """Byte objects under a store root, with exclusive create and prefix listing."""

    def __init__(self, location: str, storage_options: dict | None = None):
        self.location = location
        self._local = None if is_url(location) else local_path(location)
        if self._local is None:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(location, **remote_options(location, storage_options))
            except ImportError as e:
                raise StoreError(f"feature store {location}: {e} (for s3:// install diffeat[s3])") from e
            self.root = self.root.rstrip("/")

    @contextlib.contextmanager
    def _remote(self, *, writing: bool) -> Iterator[None]:
        """Translate errors of the remote filesystem into one-line ``StoreError``s."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - translated or re-raised as is
            reraise_remote(self.location, e, writing=writing)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"object key {key!r} would leave the store root")
        return str(self._local / key) if self._local is not None else f"{self.root}/{key}"

    # -- writes ---------------------------------------------------------------------------------
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; True if this call created it."""
        path = self._path(key)
        if self._local is not None:
            tmp = _complete_temp_file(path, data)
            try:
                os.link(tmp, path)  # fails if it exists: atomic, and the content is complete
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            with self._remote(writing=True):
                self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    def put(self, key: str, data: bytes) -> None:
        """Write (or replace) ``key`` atomically: readers see the old or the new bytes."""
        path = self._path(key)
        if self._local is not None:
            os.replace(_complete_temp_file(path, data), path)
            return
        with self._remote(writing=True):
            self.fs.pipe_file(path, data)

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        path = self._path(key)
        try:
            if self._local is not None:
                os.unlink(path)
            else:
                with self._remote(writing=True):
                    self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # -- reads ----------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The bytes of ``key``, or None if it does not exist."""
        path = self._path(key)
        try:
            if self._local is not None:
                return Path(path).read_bytes()  # a key deleted since it was listed: FileNotFoundError, None
            with self._remote(writing=False):
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
        paths = {self.fs._strip_protocol(self._path(k)): k for k in keys}
        with self._remote(writing=False):
            got = self.fs.cat(list(paths), on_error="return")
        out = {}
        for p, v in got.items():
            if isinstance(v, BaseException):
                if isinstance(v, FileNotFoundError) and remote_error(self.location, v, writing=False) is None:
                    continue  # deleted between the listing and the read
                reraise_remote(self.location, v, writing=False)
            out[paths[self.fs._strip_protocol(p)]] = v
        return out

    def list(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` of every object under ``prefix`` (recursive; one listing on S3; ``""``: all)."""
        prefix = prefix.rstrip("/")
        base = self._path(prefix) if prefix else str(self._local) if self._local is not None else self.root
        out: dict[str, int] = {}
        if self._local is not None:
            if not os.path.isdir(base):
                return out
            for dirpath, _, files in os.walk(base):
                for name in files:
                    if name.endswith(".tmp"):
                        continue  # a create or put in flight
                    full = os.path.join(dirpath, name)
                    try:
                        size = os.path.getsize(full)
                    except FileNotFoundError:
                        continue  # deleted by another writer between the listing and the stat
                    out[os.path.relpath(full, self._local).replace(os.sep, "/")] = size
            return out
        try:
            with self._remote(writing=False):
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
        key = f".diffeat-writetest-{uuid.uuid4().hex}"  # at the root: deleting it leaves no folder behind
        try:
            self.put(key, b"diffeat write test")
            self.delete(key)
        except StoreError:
            raise  # a remote store's error, translated with the store's URL
        except (PermissionError, OSError) as e:
            raise StoreError(
                f"feature store {self.location} is not writable ({type(e).__name__}: {first_line(e)}): extract "
                "needs write access; probe, cka, ls and verify work read-only"
            ) from e

    def missing_reason(self) -> str | None:
        """Why a remote store holds no ``zarr.json``: a missing bucket, an empty prefix; None if unknown."""
        if self._local is not None:
            return None
        try:
            found = self.fs.ls(self.root, detail=False)
        except FileNotFoundError as e:
            if "bucket" in first_line(e).lower():
                return missing_bucket(self.location)
            return "nothing is stored under that prefix"
        except Exception as e:  # noqa: BLE001 - access denied, unreachable ...: translated
            reraise_remote(self.location, e, writing=False)
        if not found:
            return "nothing is stored under that prefix"
        return f"the prefix holds {len(found)} entries but no zarr.json"


def _translated(name: str, *, writing: bool):
    """``FsspecStore.<name>`` with remote errors turned into one-line ``StoreError``s."""
    async def method(self, *args, **kwargs):
        try:
            return await getattr(FsspecStore, name)(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - translated or re-raised as is
            reraise_remote(self.location, e, writing=writing)

    method.__name__ = name
    return method


def _translated_listing(name: str):
    """The async-generator ``FsspecStore.<name>`` with remote errors translated."""
    async def method(self, *args, **kwargs):
        try:
            async for key in getattr(FsspecStore, name)(self, *args, **kwargs):
                yield key
        except Exception as e:  # noqa: BLE001 - translated or re-raised as is
            reraise_remote(self.location, e, writing=False)

    method.__name__ = name
    return method


class RemoteZarrStore(FsspecStore):
    """zarr's ``FsspecStore`` whose errors of access (denied, no credentials, unreachable endpoint,
    missing bucket) are one-line ``StoreError``s naming the store, instead of tracebacks
    from deep inside zarr, fsspec and botocore. A missing key is still just a missing key."""

    location: str = ""

    @classmethod
    def open(cls, location: str, *, read_only: bool, storage_options: dict | None = None) -> RemoteZarrStore:
        """The store at fsspec URL ``location`` (``remote_options`` applied to ``storage_options``)."""
        try:
            store = cls.from_url(location, storage_options=remote_options(location, storage_options),
                                 read_only=read_only)
        except ImportError as e:
            raise StoreError(f"feature store {location}: {e} (for s3:// install diffeat[s3])") from e
        except Exception as e:  # noqa: BLE001 - translated or re-raised as is
            reraise_remote(location, e, writing=not read_only)
        store.location = location
        return store

    def with_read_only(self, read_only: bool = False) -> RemoteZarrStore:
        store = super().with_read_only(read_only)
        store.location = self.location
        return store

    def __repr__(self) -> str:
        return f"<RemoteZarrStore({self.location})>"

    # Every method that reaches the object store, with its errors translated.
    get = _translated("get", writing=False)
    get_partial_values = _translated("get_partial_values", writing=False)
    exists = _translated("exists", writing=False)
    getsize = _translated("getsize", writing=False)
    set = _translated("set", writing=True)
    delete = _translated("delete", writing=True)
    delete_dir = _translated("delete_dir", writing=True)
    list = _translated_listing("list")
    list_prefix = _translated_listing("list_prefix")
    list_dir = _translated_listing("list_dir")


def make_zarr_store(location: str, *, read_only: bool, storage_options: dict | None = None):
    """A zarr store object for a path or fsspec URL.

    URLs get a :class:`RemoteZarrStore`: listings are never cached (other writers add objects)
    and access errors (denied, no credentials, unreachable endpoint, missing bucket) are
    one-line ``StoreError``s naming the store. Paths and ``file://`` URLs get zarr's ``LocalStore``.
    """
    from zarr.storage import LocalStore

    if is_url(location):
        return RemoteZarrStore.open(location, read_only=read_only, storage_options=storage_options)
    return LocalStore(local_path(location), read_only=read_only)
