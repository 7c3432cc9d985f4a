"""User-facing errors.

Every error a user can cause (a missing file, a block that does not exist, a
store opened read-only) is a :class:`DiffeatError`. The CLI prints its message
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DiffeatError(Exception):
    """An error caused by input: the message says what is wrong and how to fix it."""


class DatasetError(DiffeatError):
    """A dataset on disk is missing, malformed, or holds an undecodable image."""


class ModelError(DiffeatError):
    """A model cannot be found, loaded or used as asked."""


class StoreError(DiffeatError):
    """A feature store is missing, read-only, incomplete or inconsistent."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's message, first line only (``limit``: at most that many characters), for one-line errors."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text if limit is None else text[:limit]
