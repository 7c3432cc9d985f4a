"""Pipelines: YAML experiment definitions run stage by stage, skipping stages whose outputs are current.

``load_pipeline(path_or_name, overrides)`` parses a file (variables, ``defaults``,
``foreach`` instances, ``matrix`` grids; see docs/pipelines.md) and
``run_pipeline(pipeline)`` runs its extract, probe, cka and report stages in order.
"""

from diffeat.pipelines.runner import PipelineReport, StageOutcome, run_pipeline
from diffeat.pipelines.spec import (
    BUILTIN_PIPELINES,
    Pipeline,
    StageInstance,
    load_pipeline,
    parse_pipeline,
)
from diffeat.pipelines.stages import KINDS
from diffeat.pipelines.variables import parse_assignments

__all__ = [
    "BUILTIN_PIPELINES",
    "KINDS",
    "Pipeline",
    "PipelineReport",
    "StageInstance",
    "StageOutcome",
    "load_pipeline",
    "parse_assignments",
    "parse_pipeline",
    "run_pipeline",
]
