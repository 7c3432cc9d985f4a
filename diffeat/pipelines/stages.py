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

from diffeat.errors import DiffeatError

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

    ``options``: accepted keys (library keyword names); ``aliases``: other spellings
    -> key; ``axes``: matrix axis -> list option; ``required``: keys that must be
    set; ``lists``: keys whose scalar value becomes a one-element list; ``run(args,
    context)`` calls the library and returns the outputs; ``present(outputs, args)``
    says whether they still exist; ``record_dir(args)`` is where the stage's record
    is kept (next to its outputs).
    """

    name: str
    options: tuple[str, ...]
    run: Callable[[dict, Context], dict]
    present: Callable[[dict, dict], bool]
    record_dir: Callable[[dict], str]
    aliases: dict[str, str] = field(default_factory=dict)
    axes: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()

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
        """Keyword arguments of the library call: required keys checked, lists made lists, axes typed."""
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


def parent_of(location: str) -> str:
    """The folder holding ``location`` (a path or fsspec URL)."""
    from diffeat.store.reader import is_url

    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).expanduser().resolve().parent)


# ---- extract ---------------------------------------------------------------------------------

def _run_extract(args: dict, context: Context) -> dict:
    from diffeat.extract import extract
    from diffeat.store import open_store

    args = dict(args)
    fs = open_store(args.pop("store"), mode="a", storage_options=args.pop("storage_options", None))
    report = extract(store=fs, **args)
    bad = [s for s in report.settings if s.outcome == "incomplete"]
    if bad:
        raise DiffeatError(f"extract left {len(bad)} setting(s) incomplete in {fs.location}, e.g. {bad[0].path}")
    return {"store": fs.location, "settings": [s.path for s in report.settings],
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


EXTRACT = StageKind(
    name="extract",
    options=("dataset", "root", "model", "store", "storage_options", "splits", "classes", "batch_size", "device",
             "dtype", "store_dtype", "num_workers", "seed", "noise_draws", "limit", "resolution", "blocks", "ts",
             "pools", "progress"),
    aliases={"split": "splits"},
    axes={"block": "blocks", "t": "ts", "pool": "pools"},
    required=("dataset", "model", "store", "blocks", "ts"),
    lists=("splits",),
    run=_run_extract,
    present=_extract_present,
    record_dir=lambda args: parent_of(str(args["store"])),
)


# ---- probe -----------------------------------------------------------------------------------

def _run_probe(args: dict, context: Context) -> dict:
    from diffeat.probe import probe

    report = probe(**args)
    return {"run_dir": str(report.run_dir), "results_csv": str(report.run_dir / "results.csv"),
            "results": report.summaries(), "seconds": round(report.seconds, 3)}


PROBE = StageKind(
    name="probe",
    options=("store", "storage_options", "dataset", "model", "name", "train_split", "test_split", "val_fraction",
             "lrs", "wds", "epochs", "min_steps", "batch_size", "standardize", "refit", "head_options", "knn_k",
             "knn_temperature", "cs", "device", "memory_budget", "seed", "out", "save_weights", "blocks", "ts",
             "pools", "heads"),
    aliases={"lr": "lrs", "wd": "wds", "knn_t": "knn_temperature", "C": "cs", "c": "cs"},
    axes={"block": "blocks", "t": "ts", "pool": "pools", "head": "heads"},
    required=("store", "dataset", "out"),
    lists=("lrs", "wds", "cs"),
    run=_run_probe,
    present=lambda outputs, args: Path(outputs.get("results_csv", "")).is_file(),
    record_dir=lambda args: str(Path(args["out"]).expanduser().resolve()),
)


# ---- cka -------------------------------------------------------------------------------------

def _run_cka(args: dict, context: Context) -> dict:
    from diffeat.cka.output import write_outputs
    from diffeat.cka.settings import SettingSpec, grid, store_cka

    args = dict(args)
    store, dataset, out = args.pop("store"), args.pop("dataset"), args.pop("out")
    split, model, title = args.pop("split", "test"), args.pop("model", None), args.pop("title", None)
    rows = [SettingSpec.parse(s) for s in args.pop("a", None) or []]
    rows += grid(args.pop("blocks", None) or [], args.pop("ts", None) or [], args.pop("pools", None) or [])
    rows += [SettingSpec.parse(f"name={n}") for n in args.pop("names", None) or []]
    cols = [SettingSpec.parse(s) for s in args.pop("b", None) or []] or None
    result = store_cka(str(store), dataset, split, rows, cols, model=model,
                       storage_options=args.pop("storage_options", None), **args)
    files = write_outputs(result, out, title=title)
    return {"files": files, "row_labels": result.row_labels, "col_labels": result.col_labels,
            "route": result.route, "n": result.n, "seconds": round(result.seconds, 3)}


CKA = StageKind(
    name="cka",
    options=("store", "storage_options", "dataset", "split", "model", "a", "b", "names", "kernel", "estimator",
             "route", "precision", "memory", "batch_size", "passes", "seed", "rbf_threshold", "subsample", "out",
             "title", "blocks", "ts", "pools"),
    aliases={"name": "names"},
    axes={"block": "blocks", "t": "ts", "pool": "pools"},
    required=("store", "dataset", "out"),
    lists=("a", "b", "names"),
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


REPORT = StageKind(
    name="report",
    options=("probe", "cka", "out", "metric", "title"),
    required=("probe", "out"),
    lists=("probe", "cka"),
    run=_run_report,
    present=lambda outputs, args: all(Path(p).is_file() for p in outputs.get("files", {}).values())
    and bool(outputs.get("files")),
    record_dir=lambda args: str(Path(args["out"]).expanduser().resolve()),
)

#: Every stage kind, by the name used as ``kind:`` (and as the default for a stage named so).
KINDS: dict[str, StageKind] = {k.name: k for k in (EXTRACT, PROBE, CKA, REPORT)}
