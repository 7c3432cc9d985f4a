"""Writing results: a run directory, a long-format CSV and a run JSON (resolved config + versions).

Shared by the probe, CKA and demo stages. Layout of one run::

    <out>/<stage>-<UTC time>-<6 hex>/
        results.csv     long format: one row per (setting, head/estimator, hyperparameters, split, metric)
        run.json        stage, resolved config, package versions, host, timings, results summary

Long format keeps every grid point and metric in one table that concatenates
across runs (``read_results``) and pivots in pandas/xarray without parsing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import math
import secrets
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffeat.errors import DiffeatError
from diffeat.runtime.envinfo import host_info, package_versions

logger = logging.getLogger(__name__)

def utc_now() -> str:
    """UTC timestamp, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_dir(out: str | Path, stage: str) -> Path:
    """Create ``<out>/<stage>-<UTC time>-<6 hex>/`` and return it (a clear error if not writable)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(out).expanduser() / f"{stage}-{stamp}-{secrets.token_hex(3)}"
    try:
        path.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        raise DiffeatError(f"cannot create the results directory {path} (--out {out}): {e}") from e
    return path


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, tuples, sets and dataclass-like dicts.

    Non-finite floats become None (JSON has no NaN).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hparams_key(hparams: dict) -> str:
    """Canonical, sortable text of a hyperparameter dict: ``{"lr":0.01,"wd":0.0}``."""
    return json.dumps(to_jsonable(hparams), sort_keys=True, separators=(",", ":"))


def write_long_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str], *, append: bool = False) -> Path:
    """Write (or append) rows to a long-format CSV with a fixed column order.

    Dict/list cells are written as canonical JSON; missing cells are empty; a row
    with a key outside ``columns`` is a bug and raises ``ValueError``.
    """
    path = Path(path)
    new = not (append and path.exists())
    with path.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: hparams_key(v) if isinstance(v, (dict, list)) else
                             ("" if v is None else to_jsonable(v)) for k, v in row.items()})
    return path


def read_results(paths: str | Path | Iterable[str | Path]) -> list[dict[str, str]]:
    """Rows of one or more ``results.csv`` files; a directory means every ``results.csv`` below it."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.rglob("results.csv")) if p.is_dir() else [p]
    else:
        files = [Path(p) for p in paths]
    rows: list[dict[str, str]] = []
    for file in files:
        with file.open(newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def write_run_json(path: str | Path, *, stage: str, config: dict, results: Any, started: str,
                   seconds: float, extra: dict | None = None) -> Path:
    """Write ``run.json``: stage, resolved config, results, versions, host and timing."""
    doc = {"stage": stage, "started": started, "finished": utc_now(), "seconds": round(seconds, 3),
           "config": config, "versions": package_versions(), "host": host_info(),
           "command": sys.argv, "results": results, **(extra or {})}
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(doc), indent=2, sort_keys=False) + "\n")
    return path
