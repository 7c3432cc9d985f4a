"""Where a store lives: a local path, a ``file://`` URL, or an fsspec URL (``s3://bucket/prefix``).

The one place that tells paths from URLs. ``file://`` URLs are local paths everywhere
(zarr's ``LocalStore``, the coordination objects, locks by hard link); every other
``scheme://`` is an fsspec filesystem. Opening a store from a location is
``diffeat.store.as_store`` (``store/reader.py``), used by extract, probe and CKA alike.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_SCHEME = "file://"


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
