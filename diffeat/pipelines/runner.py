"""Running a pipeline: each stage instance in order, skipped when its outputs match its config.

Every stage instance has a *config hash*: the sha256 of its kind, its resolved
arguments and the hashes of the instances it needs. After a run, a record
``.diffeat-<pipeline>-<instance>.json`` (hash, arguments, outputs, timing) is
written next to the stage's outputs: beside the feature store for extract, in
``out`` for the others. A later run skips the instance when that record has the
same hash and its outputs are still there (the store still holds every setting,
the results file still exists). A changed option re-runs the stage and every
stage that needs it; ``force`` re-runs everything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffeat.errors import DiffeatError
from diffeat.pipelines.spec import Pipeline, StageInstance
from diffeat.pipelines.stages import Context

logger = logging.getLogger(__name__)

RECORD_VERSION = 1


@dataclass
class StageOutcome:
    """What happened to one stage instance."""

    name: str
    kind: str
    status: str  # "ran" | "skipped" | "planned" (dry run: would run) | "current" (dry run: would skip)
    config_hash: str
    record: str  # where the record is (or would be) kept
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return dict(self.__dict__)


@dataclass
class PipelineReport:
    """The outcome of every stage instance of a run, in order."""

    pipeline: str
    stages: list[StageOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def outcome(self, name: str) -> StageOutcome:
        """The outcome of instance ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def config_hash(instance: StageInstance, args: dict, need_hashes: dict[str, str]) -> str:
    """The identity of a stage instance's work: kind, resolved arguments, and what it needs."""
    from diffeat.output.records import to_jsonable
    from diffeat.store.layout import settings_hash

    return settings_hash({"record_version": RECORD_VERSION, "kind": instance.kind.name,
                          "arguments": to_jsonable(args), "needs": need_hashes})


def record_location(pipeline: Pipeline, instance: StageInstance, args: dict) -> str:
    """Path or URL of the instance's record file."""
    folder = instance.kind.record_dir(args).rstrip("/")
    return f"{folder}/.diffeat-{pipeline.name}-{instance.name}.json"


def read_record(location: str) -> dict | None:
    """The record at ``location``, or None when there is none (or it is unreadable: then the stage re-runs)."""
    import fsspec

    try:
        with fsspec.open(location, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def write_record(location: str, record: dict) -> None:
    """Write ``record`` (JSON) to ``location``, creating its folder."""
    import fsspec

    from diffeat.output.records import to_jsonable

    fs, path = fsspec.core.url_to_fs(location)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(to_jsonable(record), indent=2) + "\n")


def run_pipeline(pipeline: Pipeline, *, stages: list[str] | None = None, force: bool = False,
                 dry_run: bool = False, on_stage: Callable[[StageOutcome], Any] | None = None) -> PipelineReport:
    """Run ``pipeline``'s stage instances in order (``stages``: only these and what they need).

    A stage whose record matches its config hash and whose outputs exist is skipped
    (``force``: run anyway). ``dry_run`` resolves everything and reports what would
    run, running nothing. ``on_stage`` is called with each outcome as it happens.
    Returns a :class:`PipelineReport`; a failing stage raises and leaves its old record.
    """
    from diffeat import __version__
    from diffeat.output.records import utc_now

    start = time.perf_counter()
    instances = pipeline.instances(stages)
    report = PipelineReport(pipeline.name)
    hashes: dict[str, str] = {}
    context = Context(stage_of={i.name: i.stage for i in instances})
    for inst in instances:
        args = inst.arguments()
        digest = config_hash(inst, args, {n: hashes[n] for n in inst.needs})
        hashes[inst.name] = digest
        location = record_location(pipeline, inst, args)
        old = read_record(location)
        current = (not force and old is not None and old.get("config_hash") == digest
                   and inst.kind.present(old.get("outputs", {}), args))
        if dry_run:
            if not current and inst.kind.preflight is not None:
                try:
                    inst.kind.preflight(args)  # what the stage would refuse at once, refused now
                except DiffeatError as e:
                    raise DiffeatError(f"stage {inst.name}: {e}") from None
            outcome = StageOutcome(inst.name, inst.kind.name, "current" if current else "planned", digest, location,
                                   outputs=old.get("outputs", {}) if current and old else {})
            if current and old:
                context.records[inst.name] = old
        elif current:
            logger.info("stage %s: skipped, outputs match its config (%s)", inst.name, location)
            context.records[inst.name] = old
            outcome = StageOutcome(inst.name, inst.kind.name, "skipped", digest, location,
                                   outputs=old.get("outputs", {}))
        else:
            logger.info("stage %s (%s): running", inst.name, inst.kind.name)
            t0, started = time.perf_counter(), utc_now()
            outputs = inst.kind.run(args, context)
            seconds = time.perf_counter() - t0
            record = {"record_version": RECORD_VERSION, "pipeline": pipeline.name,
                      "file": str(pipeline.path) if pipeline.path else None, "stage": inst.name,
                      "kind": inst.kind.name, "config_hash": digest, "arguments": args, "needs": inst.needs,
                      "outputs": outputs, "started": started, "finished": utc_now(), "seconds": round(seconds, 3),
                      "diffeat": __version__}
            write_record(location, record)
            context.records[inst.name] = record
            outcome = StageOutcome(inst.name, inst.kind.name, "ran", digest, location, seconds, outputs)
            logger.info("stage %s: done in %.1f s", inst.name, seconds)
        report.stages.append(outcome)
        if on_stage is not None:
            on_stage(outcome)
    report.seconds = time.perf_counter() - start
    return report
