"""The base of every stage's options record (``ExtractConfig``, ``ProbeConfig``, ``CkaConfig``).

A stage's options live in ONE frozen dataclass: the CLI builds it from its flags, the library
takes it (``extract(**kw)`` and friends are thin adapters that build it), a pipeline stage's
option list is its fields, a dask job carries it, and ``run.json``/the cache key record it. Its
``__post_init__`` normalises (lists become sorted tuples) and checks every option once, before
any expensive work; a bad value is a one-line ``DiffeatError`` naming the option.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

from diffeat.errors import DiffeatError

C = TypeVar("C", bound="StageConfig")


class StageConfig:
    """Mixin for a frozen dataclass of stage options (see the module docstring)."""

    #: The stage's name ("extract", "probe", "cka"): how errors and records name it.
    stage: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every option, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """Options without a default."""
        missing = dataclasses.MISSING
        return tuple(f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                     if f.default is missing and f.default_factory is missing)

    @classmethod
    def list_fields(cls) -> tuple[str, ...]:
        """Options that hold several values (a scalar given for one becomes a one-element list)."""
        return tuple(f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple"))  # type: ignore

    @classmethod
    def from_options(cls: type[C], options: dict[str, Any], where: str = "") -> C:
        """Build the record from a mapping; an unknown key is refused, listing the valid ones."""
        unknown = sorted(set(options) - set(cls.field_names()))
        if unknown:
            raise DiffeatError(f"{where or cls.stage}: unknown {cls.stage} option(s) {', '.join(unknown)}; valid "
                               f"options: {', '.join(cls.field_names())}")
        missing = [k for k in cls.required() if options.get(k) in (None, "", ())]
        if missing:
            raise DiffeatError(f"{where or cls.stage}: missing option(s) {', '.join(missing)} (a {cls.stage} "
                               f"stage needs {', '.join(cls.required())})")
        return cls(**options)

    def as_dict(self) -> dict[str, Any]:
        """Every option as JSON-friendly values (tuples become lists): the provenance record.

        Fields marked ``metadata={"secret": True}`` (storage options carry credentials) are
        never recorded: only that they were given.
        """
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "<given, not recorded>"
            out[f.name] = _plain(value)
        return out

    def key(self) -> str:
        """Canonical JSON of every option: equal records, equal keys (a cache key)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), default=str)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (and checked again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field of the frozen record in ``__post_init__``."""
        object.__setattr__(self, name, value)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def as_ints(values: Any, option: str, *, unique: bool = True) -> tuple[int, ...]:
    """A tuple of integers from an int or an iterable of ints (sorted and unique unless ``unique=False``)."""
    items = [values] if isinstance(values, (int, str)) else list(values or ())
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            try:
                v = int(str(v).strip())
            except ValueError:
                raise DiffeatError(f"{option} {v!r} is not an integer") from None
        out.append(int(v))
    return tuple(sorted(set(out))) if unique else tuple(out)


def as_floats(values: Any, option: str) -> tuple[float, ...] | None:
    """A tuple of floats (None when nothing is given)."""
    if values is None:
        return None
    items = [values] if isinstance(values, (int, float, str)) else list(values)
    out = []
    for v in items:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise DiffeatError(f"{option} {v!r} is not a number") from None
    return tuple(out) or None


def as_strs(values: Any) -> tuple[str, ...]:
    """A tuple of strings from one string or an iterable of them, order kept, duplicates dropped."""
    items: Iterable[Any] = [values] if isinstance(values, str) else (values or ())
    return tuple(dict.fromkeys(str(v) for v in items))
