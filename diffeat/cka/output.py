"""Writing a CKA result: CSV and ``.npy`` matrices, a heatmap PNG and a JSON record."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffeat.cka.results import CKAResult

logger = logging.getLogger(__name__)

_AXES = (("model", ""), ("block", "b"), ("t", "t"), ("pool", "p"))


def axis_labels(labels: Sequence[str], settings: Sequence[dict], *, with_model: bool = False
                ) -> tuple[list[str], str]:
    """Short tick labels and an axis title: only what varies goes in the ticks.

    A block sweep at t=90, pool 1 becomes ticks ``1 … 37`` titled ``block (t=90, pool=1)``;
    a block × t sweep becomes ``b24/t90`` ticks; imported names stay as they are. Settings
    without a timestep (vision backbones) have no t to show. ``with_model``: name the axis's
    model in its title when it has one (a matrix across models).
    """
    by_label = {s["label"]: s for s in settings}
    metas = [by_label.get(label, {}) for label in labels]
    extracted = [m for m in metas if m.get("block") is not None]
    varying = [k for k, _ in _AXES if len({m.get(k) for m in extracted}) > 1]
    fixed = [k for k, _ in _AXES if (k != "model" or with_model) and len({m.get(k) for m in extracted}) == 1
             and extracted[0].get(k) is not None]
    ticks = []
    for label, m in zip(labels, metas):
        if m.get("block") is None:
            ticks.append(label)
        elif len(varying) == 1 and varying[0] != "model":
            ticks.append(str(m[varying[0]]))
        else:
            ticks.append("/".join(f"{p}{m[k]}" for k, p in _AXES if k in varying and m.get(k) is not None) or label)
    title = " / ".join(varying) if varying else ("setting" if extracted else "")
    if "model" in fixed:
        title = f"{extracted[0]['model']}: {title}"
    fixed = [k for k in fixed if k != "model"]
    if fixed and extracted:
        title += " (" + ", ".join(f"{k}={extracted[0][k]}" for k in fixed) + ")"
    return ticks, title.strip()


def write_outputs(result: CKAResult, out: str | Path, *, stem: str = "cka", title: str | None = None
                  ) -> dict[str, str]:
    """Write ``<stem>.csv``, ``<stem>.npy``, ``<stem>.png`` and ``<stem>.json`` into ``out``; return their paths."""
    from diffeat.output.plots import heatmap

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("csv", "npy", "png", "json")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", *result.col_labels])
        for label, row in zip(result.row_labels, result.matrix):
            writer.writerow([label, *("" if not np.isfinite(v) else repr(float(v)) for v in row)])
    np.save(paths["npy"], result.matrix)
    several = len(result.models) > 1
    row_ticks, row_title = axis_labels(result.row_labels, result.settings, with_model=several)
    col_ticks, col_title = axis_labels(result.col_labels, result.settings, with_model=several)
    cfg = result.config
    where = f"{cfg['dataset']}/{cfg['split']}, " if cfg.get("dataset") else ""
    models = result.models_prefix
    heatmap(result.matrix, row_ticks, col_ticks, paths["png"], vmin=0.0, vmax=1.0,
            title=title or f"{models}{result.kernel} CKA ({result.estimator}), {where}n={result.n}",
            cbar_label="CKA", xlabel=col_title, ylabel=row_title)
    record = result.record()
    record["files"] = {k: p.name for k, p in paths.items()}
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    logger.debug("wrote %s.{csv,npy,png,json} in %s", stem, out)
    return {k: str(p) for k, p in paths.items()}
