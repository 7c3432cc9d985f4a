"""Option checks shared by every stage: one wording for "must be one of", "must be at least", and names.

:func:`check_name` is the one check of every name a user gives that becomes part of a path
or a file name (dataset, split, model, import and setting names in a store; pipeline, stage
and ``foreach`` entry names in record files), so that no name can leave the folder it is
meant for, hide itself, or exceed what a filesystem or an object key takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

from diffeat.errors import DiffeatError

T = TypeVar("T")

#: Longest name accepted: one path component is at most 255 bytes on common filesystems, and a
#: record file name or a store path joins several names (``features/<model>/<dataset>/...``).
NAME_MAX = 100

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: a 5,000-character value stays a readable one-line message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def check_name(name: object, what: str, *, where: str = "", error: type[DiffeatError] = DiffeatError) -> str:
    """Return ``name`` if it is safe as one path component, else raise a one-line ``error``.

    A name is letters, digits, ``.``, ``_`` and ``-``, starts with a letter or digit (no hidden
    names), holds no ``..`` and is at most :data:`NAME_MAX` characters: it can never contain a
    separator, point outside its folder, or carry a newline or a control character.
    ``what`` says which name it is (``import``, ``pipeline``, ``stage``); ``where`` prefixes the
    message (the file it came from).
    """
    ok = isinstance(name, str) and len(name) <= NAME_MAX and _SAFE_NAME.fullmatch(name) and ".." not in name
    if not ok:
        problem = (f"is {len(name)} characters long (at most {NAME_MAX})"
                   if isinstance(name, str) and len(name) > NAME_MAX else "is not allowed")
        raise error(f"{where + ': ' if where else ''}{what} name {shown(name)} {problem}: use letters, digits, "
                    f"'.', '_' and '-' (starting with a letter or digit; no '/', '\\' or '..'; at most {NAME_MAX} "
                    "characters)")
    return name
