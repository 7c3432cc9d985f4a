"""The stage kinds a pipeline can run: extract, probe, cka and report.

Each kind knows the options it accepts (those of the command of the same name,
spelled as the library's keyword arguments; a few CLI spellings are aliases),
its ``matrix`` axes, how to call the library, what it produced (its *outputs*,
recorded after a run) and how to tell that those outputs are still there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffeat.cka.config import CkaConfig
from diffeat.errors import DiffeatError
from diffeat.extract.config import ExtractConfig
from diffeat.probe.config import ProbeConfig
from diffeat.runtime.stageconfig import StageConfig
from diffeat.store.location import parent

logger = logging.getLogger(__name__)

@dataclass
class Context:
    """What a running stage may know of the others: the records of the instances done so far."""

    records: dict[str, dict] = field(default_factory=dict)  # instance name -> record
    stage_of: dict[str, str] = field(default_factory=dict)  # instance name -> stage name, for every instance

    def records_of(self, stage: str, where: str) -> list[dict]:
        """The records of every instance of ``stage``; refused when it is not a stage that ran before."""
        names = [n for n, s in self.stage_of.items() if s == stage]
        if not names:
            raise DiffeatError(f"{where}: there is no stage {stage!r} in this pipeline "
                               f"(stages: {', '.join(dict.fromkeys(self.stage_of.values()))})")
        missing = [n for n in names if n not in self.records]
        if missing:
            raise DiffeatError(f"{where}: stage {stage!r} must run before this one: add it to `needs:`")
        return [self.records[n] for n in names]


@dataclass(frozen=True)
class StageKind:
    """What a pipeline needs to know about one kind of stage.

    ``config``: the stage's options record (``ExtractConfig`` ...): its fields are the
    stage's options, those without a default are required, tuple fields take a scalar
    as a one-element list. ``report`` has no record: its ``own_options``/``own_required``/
    ``own_lists`` say the same. ``aliases``: other spellings -> option; ``axes``: matrix
    axis -> list option; ``run(args, context)`` calls the library and returns the outputs;
    ``present(outputs, args)`` says whether they still exist; ``record_dir(args)`` is where
    the stage's record is kept (next to its outputs).
    """

    name: str
    run: Callable[[dict, Context], dict]
    present: Callable[[dict, dict], bool]
    record_dir: Callable[[dict], str]
    config: type[StageConfig] | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    axes: dict[str, str] = field(default_factory=dict)
    also_required: tuple[str, ...] = ()  # required in a pipeline though the command has a default
    preflight: Callable[[dict], None] | None = None  # the stage's checks beyond its record (--dry-run)
    own_options: tuple[str, ...] = ()
    own_required: tuple[str, ...] = ()
    own_lists: tuple[str, ...] = ()
    own_check: Callable[[dict, str], None] | None = None  # the checks of a kind without a record

    @property
    def options(self) -> tuple[str, ...]:
        """Accepted option names: the record's fields."""
        return self.config.field_names() if self.config else self.own_options

    @property
    def required(self) -> tuple[str, ...]:
        """Options that must be set."""
        return (*self.config.required(), *self.also_required) if self.config else self.own_required

    @property
    def lists(self) -> tuple[str, ...]:
        """Options whose scalar value becomes a one-element list."""
        return self.config.list_fields() if self.config else self.own_lists

    def key(self, key: str) -> str | None:
        """The canonical option name of ``key`` (``batch-size`` -> ``batch_size``), or None if not accepted."""
        k = str(key).replace("-", "_")
        k = self.aliases.get(k, k)
        return k if k in self.options else None

    def accepts(self, key: str) -> bool:
        """True when ``key`` is an option of this kind (used to apply ``defaults``)."""
        return self.key(key) is not None

    def normalize(self, options: dict, where: str) -> dict:
        """Options with canonical keys; an unknown key is refused, listing the valid ones."""
        out: dict[str, Any] = {}
        for key, value in options.items():
            k = self.key(key)
            if k is None:
                hint = (f" (grid axes go under `matrix:`: {', '.join(self.axes)})"
                        if str(key) in self.axes or str(key) in self.axes.values() else "")
                raise DiffeatError(f"{where}: unknown {self.name} option {key!r}{hint}; valid options: "
                                   f"{', '.join(self.options)}")
            if k in out:
                raise DiffeatError(f"{where}: option {k!r} is given twice (as {key!r} and another spelling)")
            out[k] = value
        return out

    def matrix(self, matrix: dict, where: str) -> dict:
        """The ``matrix`` axes as options (``{block: [19, 24]}`` -> ``{"blocks": [19, 24]}``)."""
        out: dict[str, Any] = {}
        for axis, values in matrix.items():
            if axis not in self.axes:
                valid = ", ".join(self.axes) or "none"
                raise DiffeatError(f"{where}: {self.name} stages have no matrix axis {axis!r} (axes: {valid})")
            out[self.axes[axis]] = values  # made a flat list after variables are resolved (see arguments)
        return out

    def arguments(self, options: dict, where: str) -> dict:
        """Keyword arguments of the library call: required keys checked, lists made lists, axes typed.

        With a record, the arguments are also checked by it (``check``), so a pipeline is
        refused before anything runs for what the command would refuse.
        """
        missing = [k for k in self.required if options.get(k) in (None, "")]
        if missing:
            raise DiffeatError(f"stage {where}: missing option(s) {', '.join(missing)} (a {self.name} stage needs "
                               f"{', '.join(self.required)})")
        args = dict(options)
        for k in (*self.lists, *self.axes.values()):
            if k in args and args[k] is not None:
                # A scalar is a one-element list; `block: [${early}, 24]` with a list variable is flattened.
                values = args[k] if isinstance(args[k], list) else [args[k]]
                args[k] = [x for v in values for x in (v if isinstance(v, list) else [v])]
        for axis, k in self.axes.items():
            for v in args.get(k) or []:
                ok = isinstance(v, str) if axis == "head" else isinstance(v, int) and not isinstance(v, bool)
                if not ok:
                    raise DiffeatError(f"stage {where}: matrix.{axis} value {v!r} must be "
                                       f"{'a head name' if axis == 'head' else 'an integer'}")
        return args

    def check(self, args: dict, where: str) -> StageConfig | None:
        """The stage's options record built from ``args`` (its own checks run); None for kinds without one."""
        if self.config is None:
            if self.own_check is not None:
                self.own_check(args, where)
            return None
        try:
            return self.config.from_options(args, f"stage {where}")
        except DiffeatError as e:
            text = str(e)
            raise DiffeatError(text if text.startswith("stage ") else f"stage {where}: {text}") from None


# ---- extract ---------------------------------------------------------------------------------

def _run_extract(args: dict, context: Context) -> dict:
    from diffeat.extract import ExtractConfig, run_extract

    report = run_extract(ExtractConfig(**args))
    bad = [s for s in report.settings if s.outcome == "incomplete"]
    if bad:
        raise DiffeatError(f"extract left {len(bad)} setting(s) incomplete in {report.store}, e.g. {bad[0].path}")
    return {"store": report.store, "settings": [s.path for s in report.settings],
            "outcomes": {s.outcome: sum(x.outcome == s.outcome for x in report.settings) for s in report.settings},
            "images": report.images, "seconds": round(report.seconds, 3)}


def _extract_present(outputs: dict, args: dict) -> bool:
    from diffeat.store import open_store

    try:
        fs = open_store(args["store"], mode="r", storage_options=args.get("storage_options"))
        complete = {s.path for s in fs.list_settings() if s.status == "complete"}
    except DiffeatError:
        return False
    return set(outputs.get("settings", [])) <= complete and bool(outputs.get("settings"))


def _extract_preflight(args: dict) -> None:
    from diffeat.extract.run import check_extract

    check_extract(ExtractConfig(**args))


def _device_preflight(args: dict) -> None:
    from diffeat.runtime.devices import resolve_device

    resolve_device(args.get("device", "auto"))


EXTRACT = StageKind(
    name="extract",
    config=ExtractConfig,
    preflight=_extract_preflight,
    aliases={"split": "splits"},
    axes={"block": "blocks", "t": "ts", "pool": "pools"},
    run=_run_extract,
    present=_extract_present,
    record_dir=lambda args: parent(str(args["store"])),
)


# ---- probe -----------------------------------------------------------------------------------

def _run_probe(args: dict, context: Context) -> dict:
    from diffeat.probe import ProbeConfig, run_probe

    report = run_probe(ProbeConfig(**args))
    return {"run_dir": str(report.run_dir), "results_csv": str(report.run_dir / "results.csv"),
            "results": report.summaries(), "seconds": round(report.seconds, 3)}


PROBE = StageKind(
    name="probe",
    config=ProbeConfig,
    preflight=_device_preflight,
    aliases={"lr": "lrs", "wd": "wds", "knn_t": "knn_temperature", "C": "cs", "c": "cs"},
    axes={"block": "blocks", "t": "ts", "pool": "pools", "head": "heads"},
    run=_run_probe,
    present=lambda outputs, args: Path(outputs.get("results_csv", "")).is_file(),
    record_dir=lambda args: str(Path(args.get("out", "results")).expanduser().resolve()),
)


# ---- cka -------------------------------------------------------------------------------------

def _run_cka(args: dict, context: Context) -> dict:
    from diffeat.cka import CkaConfig, run_cka

    result = run_cka(CkaConfig(**args))
    return {"files": result.files, "row_labels": result.row_labels, "col_labels": result.col_labels,
            "route": result.route, "n": result.n, "seconds": round(result.seconds, 3)}


CKA = StageKind(
    name="cka",
    config=CkaConfig,
    aliases={"name": "names", "memory": "memory_budget"},
    axes={"block": "blocks", "t": "ts", "pool": "pools"},
    also_required=("out",),  # a pipeline's CKA stage keeps its files (and its record beside them)
    run=_run_cka,
    present=lambda outputs, args: all(Path(p).is_file() for p in outputs.get("files", {}).values())
    and bool(outputs.get("files")),
    record_dir=lambda args: str(Path(args["out"]).expanduser().resolve()),
)


# ---- report ----------------------------------------------------------------------------------

def _run_report(args: dict, context: Context) -> dict:
    from diffeat.pipelines.report import write_report

    def records(key: str) -> list[dict]:
        return [r for stage in args.get(key) or [] for r in context.records_of(stage, f"report.{key}")]

    return write_report(records=records("probe"), cka_records=records("cka"),
                        **{k: v for k, v in args.items() if k not in ("probe", "cka")})


def _check_report(args: dict, where: str) -> None:
    from diffeat.pipelines.report import check_report_options

    check_report_options(args, where)


REPORT = StageKind(
    name="report",
    own_options=("probe", "cka", "out", "metric", "title"),
    own_required=("probe", "out"),
    own_lists=("probe", "cka"),
    own_check=_check_report,
    run=_run_report,
    present=lambda outputs, args: all(Path(p).is_file() for p in outputs.get("files", {}).values())
    and bool(outputs.get("files")),
    record_dir=lambda args: str(Path(args["out"]).expanduser().resolve()),
)

#: Every stage kind, by the name used as ``kind:`` (and as the default for a stage named so).
KINDS: dict[str, StageKind] = {k.name: k for k in (EXTRACT, PROBE, CKA, REPORT)}
