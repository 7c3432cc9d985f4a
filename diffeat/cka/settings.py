"""Naming feature settings: ``block=24,t=90,pool=1``, a grid of them, or an import name.

Settings of several models can share one matrix: ``model=adm256,block=24,t=90,pool=1`` against
``model=microsoft--resnet-50,block=3,pool=1`` (a vision backbone's settings have no t). In a
setting, ``block=0-4`` is five settings and ``block=*`` every block the store holds for the
other keys (``model=random-resnet50,block=*,pool=1``: all stages of that ResNet).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from diffeat.errors import DiffeatError

_INT_KEYS = ("block", "t", "pool")
_STR_KEYS = ("model", "name")
_ALIASES = {"b": "block", "k": "pool", "timestep": "t"}
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass(frozen=True)
class SettingSpec:
    """Which feature array to read: an extracted (block, t, pool) or an imported ``name``.

    Keys left as ``None`` match anything, as long as exactly one array matches.
    ``all_blocks`` (``block=*``): every block the store holds that matches the other keys.
    """

    block: int | None = None
    t: int | None = None
    pool: int | None = None
    model: str | None = None
    name: str | None = None
    all_blocks: bool = False

    @classmethod
    def parse_all(cls, text: str) -> list[SettingSpec]:
        """``parse``, with a block range expanded: ``"model=m,block=0-4,pool=1"`` is five settings."""
        parts = text.split(",")
        for i, part in enumerate(parts):
            key, sep, value = part.partition("=")
            match = _RANGE.match(value) if sep and _ALIASES.get(key.strip(), key.strip()) == "block" else None
            if match:
                lo, hi = int(match[1]), int(match[2])
                if hi < lo:
                    raise DiffeatError(f"bad setting {text!r}: block range {lo}-{hi} is empty")
                return [cls.parse(",".join(parts[:i] + [f"block={b}"] + parts[i + 1:])) for b in range(lo, hi + 1)]
        return [cls.parse(text)]

    @classmethod
    def parse(cls, text: str) -> SettingSpec:
        """``"block=24,t=90,pool=1"``, ``"b=24,t=90"``, ``"name=resnet50"`` or a bare import name ``"resnet50"``.

        ``model=`` names the model (settings of several models share one matrix); ``block=*`` means
        every stored block matching the other keys.
        """
        text = text.strip()
        if not text:
            raise DiffeatError("empty setting: use e.g. block=24,t=90,pool=1 or name=resnet50")
        if "=" not in text:
            return cls(name=text)
        values: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = _ALIASES.get(key.strip(), key.strip())
            value = value.strip()
            if not sep or key not in _INT_KEYS + _STR_KEYS or not value:
                raise DiffeatError(
                    f"bad setting {text!r}: expected key=value pairs with keys block, t, pool, model, name "
                    "(e.g. block=24,t=90,pool=1)"
                )
            if key in values or (key == "block" and "all_blocks" in values):
                raise DiffeatError(f"bad setting {text!r}: {key} given twice")
            if key == "block" and value == "*":
                values["all_blocks"] = True
            elif key in _INT_KEYS:
                try:
                    values[key] = int(value)
                except ValueError:
                    raise DiffeatError(f"bad setting {text!r}: {key} must be an integer, got {value!r}") from None
            else:
                values[key] = value
        spec = cls(**values)
        if spec.name is not None and (spec.all_blocks or any(getattr(spec, k) is not None for k in _INT_KEYS)):
            raise DiffeatError(f"bad setting {text!r}: an imported name has no block/t/pool")
        return spec

    def __str__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in _INT_KEYS + _STR_KEYS if getattr(self, k) is not None]
        return ",".join((["block=*"] if self.all_blocks else []) + parts)


def grid(blocks: Iterable[int] = (), ts: Iterable[int] = (), pools: Iterable[int] = (),
         model: str | None = None) -> list[SettingSpec]:
    """Every (block, t, pool) combination; an empty axis means "whichever one the store holds"."""
    blocks, ts, pools = list(blocks) or [None], list(ts) or [None], list(pools) or [None]
    if blocks == [None] and ts == [None] and pools == [None]:
        return []
    return [SettingSpec(b, t, k, model) for b in blocks for t in ts for k in pools]


