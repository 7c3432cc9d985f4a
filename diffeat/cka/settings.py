"""Naming feature settings: ``block=24,t=90,pool=1``, a grid of them, or an import name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from diffeat.errors import DiffeatError

_INT_KEYS = ("block", "t", "pool")
_STR_KEYS = ("model", "name")
@dataclass(frozen=True)
class SettingSpec:
    """Which feature array to read: an extracted (block, t, pool) or an imported ``name``.

    Keys left as ``None`` match anything, as long as exactly one array matches.
    """

    block: int | None = None
    t: int | None = None
    pool: int | None = None
    model: str | None = None
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> SettingSpec:
        """``"block=24,t=90,pool=1"``, ``"b=24,t=90"``, ``"name=resnet50"`` or a bare import name ``"resnet50"``."""
        text = text.strip()
        if not text:
            raise DiffeatError("empty setting: use e.g. block=24,t=90,pool=1 or name=resnet50")
        if "=" not in text:
            return cls(name=text)
        values: dict[str, Any] = {}
        aliases = {"b": "block", "k": "pool", "timestep": "t"}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = aliases.get(key.strip(), key.strip())
            value = value.strip()
            if not sep or key not in _INT_KEYS + _STR_KEYS or not value:
                raise DiffeatError(
                    f"bad setting {text!r}: expected key=value pairs with keys block, t, pool, model, name "
                    "(e.g. block=24,t=90,pool=1)"
                )
            if key in values:
                raise DiffeatError(f"bad setting {text!r}: {key} given twice")
            if key in _INT_KEYS:
                try:
                    values[key] = int(value)
                except ValueError:
                    raise DiffeatError(f"bad setting {text!r}: {key} must be an integer, got {value!r}") from None
            else:
                values[key] = value
        spec = cls(**values)
        if spec.name is not None and any(getattr(spec, k) is not None for k in _INT_KEYS):
            raise DiffeatError(f"bad setting {text!r}: an imported name has no block/t/pool")
        return spec

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k)}" for k in _INT_KEYS + _STR_KEYS if getattr(self, k) is not None)


def grid(blocks: Iterable[int] = (), ts: Iterable[int] = (), pools: Iterable[int] = (),
         model: str | None = None) -> list[SettingSpec]:
    """Every (block, t, pool) combination; an empty axis means "whichever one the store holds"."""
    blocks, ts, pools = list(blocks) or [None], list(ts) or [None], list(pools) or [None]
    if blocks == [None] and ts == [None] and pools == [None]:
        return []
    return [SettingSpec(b, t, k, model) for b in blocks for t in ts for k in pools]


