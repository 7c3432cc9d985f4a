"""Reading a pipeline file: stages, ``defaults``, ``foreach`` instances and ``matrix`` grids.

A pipeline YAML (docs/pipelines.md)::

    name: demo
    vars: {out: ./diffeat-demo, store: "${out}/features.zarr"}
    defaults: {dataset: digits, store: "${store}"}
    stages:
      extract:                       # kind defaults to the stage name (extract, probe, cka, report)
        model: digits-ddpm
        matrix: {block: [2, 7, 11], t: [10, 100], pool: [1]}
      probe:
        needs: [extract]             # default: every earlier stage
        matrix: {head: [linear]}
        out: "${out}/probe"

Stage options are the options of the command of the same name (``batch_size`` or
``batch-size``). ``matrix`` takes the grid axes ``block``, ``t``, ``pool`` (and ``head``
for probes): one call runs their product. ``foreach`` (a mapping name -> options)
makes one instance per entry, named ``stage@name``, whose options override the
stage's; ``${item}`` is the entry's name and each of its keys is a variable too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffeat.errors import DiffeatError
from diffeat.pipelines.stages import KINDS, StageKind
from diffeat.pipelines.variables import Resolver, collect

TOP_KEYS = ("name", "description", "vars", "defaults", "stages")
STAGE_META = ("kind", "needs", "foreach", "matrix", "description")

#: Pipelines that ship inside the package (``diffeat run demo``).
BUILTIN_PIPELINES = ("demo",)


@dataclass
class StageInstance:
    """One runnable stage: a stage, or one ``foreach`` entry of it, with its options resolved."""

    name: str  # "probe" or "probe@cub"
    stage: str  # the stage's name in the file
    item: str | None  # the foreach entry's name
    kind: StageKind
    options: dict[str, Any]  # resolved stage options (matrix axes included), before mapping to arguments
    needs: list[str] = field(default_factory=list)  # instance names this one depends on

    def arguments(self) -> dict[str, Any]:
        """The library call's keyword arguments, checked by the stage's own options record."""
        args = self.kind.arguments(self.options, self.name)
        self.kind.check(args, self.name)
        return args


@dataclass
class Pipeline:
    """A parsed pipeline: its stages in file order and the variables to resolve them with."""

    name: str
    path: Path | None
    description: str
    variables: dict[str, Any]  # raw values after overrides (resolved lazily)
    stages: dict[str, dict[str, Any]]  # raw stage mappings, defaults merged

    @property
    def where(self) -> str:
        """How errors name this pipeline."""
        return str(self.path) if self.path else self.name

    def instances(self, only: list[str] | None = None) -> list[StageInstance]:
        """Every stage instance in run order, options resolved; ``only``: these stages and those they need.

        Resolving only what will run means a pipeline can be run in parts before all
        its variables (e.g. a second dataset's root) are known.
        """
        wanted = None
        if only:
            unknown = [s for s in only if s not in self.stages]
            if unknown:
                raise DiffeatError(f"{self.where}: no stage {unknown[0]!r}; stages: {', '.join(self.stages)}")
            wanted = self._closure(only)
        out: list[StageInstance] = []
        resolver = Resolver(self.variables, self.where)
        for name, raw in self.stages.items():
            if wanted is None or name in wanted:
                out.extend(self._expand(name, raw, resolver, out))
        return out

    def _needs_of(self, name: str) -> list[str]:
        """Stage names that ``name`` needs (default: every earlier stage)."""
        raw = self.stages[name]
        order = list(self.stages)
        if "needs" not in raw:
            return order[:order.index(name)]
        needs = raw["needs"] or []
        if isinstance(needs, str):
            needs = [needs]
        for n in needs:
            if n not in self.stages or order.index(n) >= order.index(name):
                raise DiffeatError(f"{self.where}: stages.{name}.needs names {n!r}, which is not an earlier stage "
                                   f"(earlier stages: {', '.join(order[:order.index(name)]) or 'none'})")
        return list(needs)

    def _closure(self, only: list[str]) -> set[str]:
        todo, seen = list(only), set()
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(self._needs_of(s))
        return seen

    def _expand(self, name: str, raw: dict, resolver: Resolver, earlier: list[StageInstance]) -> list[StageInstance]:
        kind = KINDS[raw.get("kind", name)]
        foreach = raw.get("foreach")
        items: list[tuple[str | None, dict]] = [(None, {})]
        if foreach is not None:
            if not isinstance(foreach, dict) or not foreach:
                raise DiffeatError(f"{self.where}: stages.{name}.foreach must be a mapping of entry name -> options")
            items = []
            for key, value in foreach.items():
                if not isinstance(value, dict):
                    raise DiffeatError(f"{self.where}: stages.{name}.foreach.{key} must be a mapping of options")
                items.append((str(key), value))
        needs = self._needs_of(name)
        out = []
        for item, extra in items:
            inst = f"{name}@{item}" if item is not None else name
            local = resolver.child({"item": item, **extra}) if item is not None else resolver
            options = {k: v for k, v in raw.items() if k not in STAGE_META}
            options.update(extra)
            options = kind.normalize(options, f"{self.where}: stages.{name}")
            matrix = raw.get("matrix") or {}
            if not isinstance(matrix, dict):
                raise DiffeatError(f"{self.where}: stages.{name}.matrix must be a mapping of axis -> values")
            options.update(kind.matrix(matrix, f"{self.where}: stages.{name}.matrix"))
            resolved = local.resolve(options, f"stages.{inst}")
            deps = []
            for n in needs:
                mine = [e.name for e in earlier if e.stage == n]
                same = [m for m in mine if item is not None and m == f"{n}@{item}"]
                deps.extend(same or mine)
            instance = StageInstance(inst, name, item, kind, resolved, deps)
            instance.arguments()  # check required options and types now, before anything runs
            out.append(instance)
        return out


def _set_dotted(stages: dict, defaults: dict, key: str, value: Any, where: str) -> None:
    """Apply an override ``stage.key[.sub]=value`` (or ``defaults.key=value``) to the raw mappings."""
    head, *path = key.split(".")
    if head == "defaults":
        target = defaults
    elif head in stages:
        target = stages[head]
    else:
        raise DiffeatError(f"--set {key}=...: {where} has no stage {head!r} (stages: {', '.join(stages)})")
    for part in path[:-1]:
        nxt = target.get(part)
        if nxt is None:
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            raise DiffeatError(f"--set {key}=...: {head}.{part} is not a mapping")
        target = nxt
    target[path[-1]] = value


def builtin_path(name: str) -> Path:
    """The packaged pipeline file ``name`` (e.g. ``demo``)."""
    return Path(str(resources.files("diffeat.pipelines").joinpath(f"{name}.yaml")))


def load_pipeline(source: str | Path, overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Pipeline:
    """Parse pipeline ``source`` (a YAML path, or a built-in name such as ``demo``) and apply ``overrides``.

    ``overrides``: ``{"data_root": "/data"}`` sets a variable; ``{"probe.epochs": 5}`` sets
    a stage option (``defaults.device`` a default). Variables also come from
    ``DIFFEAT_VAR_<NAME>`` in ``environ`` (default ``os.environ``). Raises ``DiffeatError``
    naming the file and key for anything malformed.
    """
    path = Path(source).expanduser()
    if not path.is_file() and str(source) in BUILTIN_PIPELINES:
        # A built-in name wins over a folder of the same name (`diffeat demo --out demo` makes ./demo).
        path = builtin_path(str(source))
    if not path.is_file():
        raise DiffeatError(f"pipeline {source}: no such file (built-in pipelines: {', '.join(BUILTIN_PIPELINES)})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DiffeatError(f"{path} is not valid YAML: {e}") from e
    return parse_pipeline(doc, path=path, overrides=overrides, environ=environ)


def parse_pipeline(doc: Any, *, path: Path | None = None, overrides: dict[str, Any] | None = None,
                   environ: dict[str, str] | None = None) -> Pipeline:
    """Build a :class:`Pipeline` from a parsed YAML document (see :func:`load_pipeline`)."""
    where = str(path) if path else "pipeline"
    if not isinstance(doc, dict):
        raise DiffeatError(f"{where}: a pipeline is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = set(doc) - set(TOP_KEYS)
    if unknown:
        raise DiffeatError(f"{where}: unknown top-level key(s) {sorted(unknown)}; valid: {', '.join(TOP_KEYS)}")
    stages = copy.deepcopy(doc.get("stages") or {})
    if not isinstance(stages, dict) or not stages:
        raise DiffeatError(f"{where}: `stages:` must map stage names to their options")
    defaults = copy.deepcopy(doc.get("defaults") or {})
    declared = doc.get("vars") or {}
    if not isinstance(defaults, dict) or not isinstance(declared, dict):
        raise DiffeatError(f"{where}: `defaults:` and `vars:` must be mappings")
    plain, dotted = {}, {}
    for key, value in (overrides or {}).items():
        (dotted if "." in key else plain)[key] = value
    for name, raw in stages.items():
        if not isinstance(raw, dict):
            raise DiffeatError(f"{where}: stages.{name} must be a mapping of options")
        kind = raw.get("kind", name)
        if kind not in KINDS:
            raise DiffeatError(f"{where}: stages.{name} has kind {kind!r}; choose one of {', '.join(KINDS)} "
                               "(set `kind:` when the stage name is not one of them)")
        if "@" in str(name):
            raise DiffeatError(f"{where}: stage name {name!r} may not contain '@'")
    for key, value in dotted.items():
        _set_dotted(stages, defaults, key, value, where)
    used = set()
    for name, raw in stages.items():
        kind = KINDS[raw.get("kind", name)]
        for key, value in defaults.items():
            if kind.accepts(key):
                used.add(key)
                raw.setdefault(key, copy.deepcopy(value))
    if set(defaults) - used:
        raise DiffeatError(f"{where}: defaults {sorted(set(defaults) - used)} are options of no stage here")
    builtins = {"pipeline_dir": str(path.resolve().parent) if path else str(Path.cwd())}
    variables = collect(declared, plain, environ, builtins, where)
    name = str(doc.get("name") or (path.stem if path else "pipeline"))
    return Pipeline(name, path, str(doc.get("description") or ""), variables, stages)
