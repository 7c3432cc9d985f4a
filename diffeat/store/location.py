"""Where a store lives: a local path, a ``file://`` URL, or an fsspec URL (``s3://bucket/prefix``).

The one place that tells paths from URLs. ``file://`` URLs are local paths everywhere
(zarr's ``LocalStore``, the coordination objects, locks by hard link); every other
``scheme://`` is an fsspec filesystem. Opening a store from a location is
``diffeat.store.as_store`` (``store/reader.py``), used by extract, probe and CKA alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffeat.errors import StoreError
from diffeat.runtime.checks import shown

FILE_SCHEME = "file://"

#: Longest location accepted (Linux PATH_MAX is 4096 bytes; an S3 key is at most 1024 bytes).
LOCATION_MAX = 1024
#: Longest component of a location (NAME_MAX of common filesystems, in bytes).
COMPONENT_MAX = 255


def check_location(location: str | Path | None, option: str = "--store") -> str:
    """``location`` as a string if it can name a store or folder, else a one-line ``StoreError``.

    Refused before anything is created: an empty value (which would mean the current
    folder), control characters (a newline in a folder name), a location longer than
    ``LOCATION_MAX`` characters or with a component over ``COMPONENT_MAX`` bytes (the
    filesystem would refuse it half-way through a run).
    """
    text = "" if location is None else str(location)
    if not text.strip():
        raise StoreError(f"{option} is empty: give a path or fsspec URL")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise StoreError(f"{option} {shown(text)} contains a control character (a newline?)")
    if len(text) > LOCATION_MAX:
        raise StoreError(f"{option} {shown(text)} is {len(text)} characters long: at most {LOCATION_MAX}")
    longest = max(text.split("://", 1)[-1].split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > COMPONENT_MAX:
        raise StoreError(f"{option} {shown(text)} has a component of {len(longest.encode())} bytes "
                         f"({shown(longest, 24)}): at most {COMPONENT_MAX}")
    return text


def is_url(location: str | Path) -> bool:
    """True for an fsspec URL (``s3://``, ``gs://``, ``memory://`` ...), False for a path or ``file://`` URL."""
    text = str(location)
    return "://" in text and not text.startswith(FILE_SCHEME)


def protocol(location: str | Path) -> str:
    """The fsspec protocol: ``s3`` for ``s3://b/p``, ``file`` for a path or a ``file://`` URL."""
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def local_path(location: str | Path) -> Path:
    """The absolute local path of a path or ``file://`` URL (``~`` expanded); a ``ValueError`` for other URLs."""
    text = str(location)
    if is_url(text):
        raise ValueError(f"{text} is not a local path")
    if text.startswith(FILE_SCHEME):
        text = text[len(FILE_SCHEME):]
    return Path(os.path.abspath(os.path.expanduser(text)))


def absolute(location: str | Path) -> str:
    """The location as another process on another machine must see it: URLs as they are, paths absolute."""
    return str(location) if is_url(location) else str(local_path(location))


def parent(location: str | Path) -> str:
    """The folder holding ``location`` (a URL's parent prefix, or a path's absolute parent folder)."""
    if is_url(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(local_path(location).resolve().parent)


def bucket(location: str | Path) -> str:
    """The bucket (first path element) of an object-store URL: ``team`` for ``s3://team/feats.zarr``."""
    return str(location).split("://", 1)[-1].split("/", 1)[0]
