"""``diffeat demo``: the built-in pipeline on the built-in model and dataset, end to end, on a CPU.

It runs ``diffeat/pipelines/demo.yaml`` (a copy ships as ``pipelines/demo.yaml``):
digits-ddpm features of every block at a few timesteps, a linear probe per setting,
CKA between blocks, and a report folder (``accuracy.png``, ``cka.png``,
``results.csv``, ``summary.md``). Re-running reuses everything that is already there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffeat.pipelines import PipelineReport, StageOutcome, load_pipeline, run_pipeline
from diffeat.pipelines.spec import builtin_path

logger = logging.getLogger(__name__)

DEFAULT_OUT = "diffeat-demo"


@dataclass
class DemoResult:
    """Where the demo wrote its report, what won, and what each stage did."""

    out: Path
    summary: Path
    best: dict  # block, t, test accuracy (fraction) ... of the best setting
    report: PipelineReport


def run_demo(out: str | Path = DEFAULT_OUT, *, model: str | None = None, force: bool = False,
             overrides: dict[str, Any] | None = None, on_stage: Any = None) -> DemoResult:
    """Run the demo pipeline into ``out`` and return where its report is.

    ``model`` replaces digits-ddpm (e.g. ``random:digits-ddpm``, the same network with
    random weights, for a baseline); ``overrides`` are further ``--set`` values (e.g.
    ``{"ts": [50]}``); ``force`` re-runs stages whose outputs are current.
    """
    values: dict[str, Any] = {"out": str(out), **(overrides or {})}
    if model is not None:
        values["model"] = model
    pipeline = load_pipeline(builtin_path("demo"), values)
    report = run_pipeline(pipeline, force=force, on_stage=on_stage)
    outputs = report.outcome("report").outputs
    best = outputs["best"][0] if outputs.get("best") else {}
    return DemoResult(Path(out), Path(outputs["files"]["summary"]), best, report)


__all__ = ["DEFAULT_OUT", "DemoResult", "StageOutcome", "run_demo"]
