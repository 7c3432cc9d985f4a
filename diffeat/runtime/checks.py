"""Option checks shared by every stage: one wording for "must be one of" and "must be at least"."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from diffeat.errors import DiffeatError

T = TypeVar("T")


def check_choice(value: T, choices: Iterable[T], option: str, *, error: type[DiffeatError] = DiffeatError) -> T:
    """Return ``value`` if it is one of ``choices``, else raise a one-line ``error`` listing them.

    ``option`` names what was given (``--dtype``, ``cub split``): the message reads
    ``--dtype 'float8' is invalid: choose one of float32, bfloat16, float16``.
    """
    allowed = list(choices)
    if value not in allowed:
        raise error(f"{option} {value!r} is invalid: choose one of {', '.join(map(str, allowed))}")
    return value


def check_at_least(value: int | float, low: int | float, option: str, *, what: str = "") -> int | float:
    """Return ``value`` if it is a number >= ``low``, else raise a one-line ``DiffeatError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise DiffeatError(f"{option} {value!r} is invalid: it must be {what or 'a number'} >= {low}")
    return value
