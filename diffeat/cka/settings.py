"""Naming feature settings (``block=24,t=90,pool=1``, an import name) and opening them from a store."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from diffeat.cka.api import CKAResult, cka_matrix
from diffeat.cka.sources import FeatureSetSource
from diffeat.errors import DiffeatError

logger = logging.getLogger(__name__)

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


def open_specs(store: Any, dataset: str, split: str, specs: Sequence[SettingSpec],
               model: str | None = None) -> list[FeatureSetSource]:
    """Open each spec read-only from ``store`` (a ``FeatureStore``); ``model`` applies to extracted settings."""
    from diffeat.store.reader import is_url

    out = []
    for spec in specs:
        if spec.name is not None:
            fs = store.open_features(dataset=dataset, split=split, name=spec.name, model=spec.model)
        else:
            fs = store.open_features(dataset=dataset, split=split, block=spec.block, t=spec.t, pool=spec.pool,
                                     model=spec.model or model)
        source = FeatureSetSource(fs)
        if is_url(store.location):  # what dask workers need to open the array themselves (not in meta/JSON)
            source.store_location, source.storage_options = store.location, store.storage_options
        out.append(source)
    return out


def store_cka(store: str, dataset: str, split: str, a: Sequence[SettingSpec], b: Sequence[SettingSpec] | None = None,
              *, model: str | None = None, storage_options: dict | None = None, scheduler: str | None = None,
              workers: int | None = None, **options: Any) -> CKAResult:
    """CKA between settings of a store (opened read-only: nothing is ever written to it).

    ``a``/``b``: the row and column settings (``b`` defaults to ``a``); ``scheduler`` (address of
    a running dask scheduler) or ``workers`` (a local cluster of that many processes, for this
    call): compute the exact linear routes on a dask cluster (:mod:`diffeat.cka.cluster`);
    other keywords are :func:`diffeat.cka.cka_matrix` options. The result's ``config`` records
    the resolved settings.
    """
    from diffeat.cluster import check_cluster_options, cluster_client
    from diffeat.store import open_store

    check_cluster_options(scheduler, workers)
    if not a:
        raise DiffeatError("no settings to compare: give --a/--b, or --blocks/--t/--pool, or --name")
    fs = open_store(store, mode="r", storage_options=storage_options)
    rows = open_specs(fs, dataset, split, a, model)
    cols = rows if b is None else open_specs(fs, dataset, split, b, model)
    asked = {"scheduler": scheduler, "workers": workers}
    if scheduler is not None or workers is not None:
        single = {"RBF CKA": options.get("kernel", "linear") != "linear",
                  "--route minibatch": options.get("route", "auto") == "minibatch",
                  "--subsample (the subset is held in memory)": options.get("subsample") is not None}
        reason = next((k for k, v in single.items() if v), None)
        if reason:
            logger.warning("%s runs in this process: only the exact linear routes (features, gram) use "
                           "--scheduler/--workers", reason)
            scheduler = workers = None
    with cluster_client(scheduler, workers) as client:
        result = cka_matrix(rows, cols, client=client, **options)
    result.config = {"store": str(store), "dataset": dataset, "split": split, "model": model,
                     "a": [str(s) for s in a], "b": None if b is None else [str(s) for s in b]}
    if asked["scheduler"] is not None or asked["workers"] is not None:
        result.config.update(asked, cluster_used=bool(result.plan.get("cluster", {}).get("used")))
    return result
