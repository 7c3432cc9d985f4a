"""Pipeline variables: ``${name}`` interpolation, ``--set`` overrides and ``DIFFEAT_VAR_<NAME>``.

A pipeline declares its variables under ``vars:``; a value of ``null`` means the
user must supply it (the data root of a dataset, the path of a converted model).
Values come, strongest first, from ``--set name=value``, from the environment
variable ``DIFFEAT_VAR_<NAME>`` (the name upper-cased), and from the file.

Interpolation: ``${name}`` inside a string is replaced by the variable's text; a
string that is exactly ``${name}`` takes the variable's value with its type (a
list stays a list); ``$$`` is a literal ``$``. Variables may use other variables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from diffeat.errors import DiffeatError

ENV_PREFIX = "DIFFEAT_VAR_"
_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_value(text: str) -> Any:
    """A ``--set`` or environment value as YAML (``90`` -> int, ``[19, 24]`` -> list, ``a/b`` -> str)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text  # not YAML (e.g. an unbalanced bracket in a path): take it as written


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["data_root=/data", "probe.epochs=5"]`` -> ``{"data_root": "/data", "probe.epochs": 5}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DiffeatError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data_root=/data")
        out[key] = parse_value(value)
    return out


def check_name(name: str, where: str) -> None:
    """Refuse a variable name that could not be written as ``${name}``."""
    if not _NAME.match(name):
        raise DiffeatError(f"{where}: variable name {name!r} must be letters, digits and _ (not starting with a digit)")


def collect(declared: Mapping[str, Any], overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None,
            builtins: Mapping[str, Any] | None = None, where: str = "pipeline") -> dict[str, Any]:
    """The variables' raw values: file < ``DIFFEAT_VAR_*`` < ``overrides``; built-ins cannot be overridden.

    An override of a variable the pipeline does not declare is refused (a typo would
    otherwise be silently ignored), naming the declared ones.
    """
    environ = os.environ if environ is None else environ
    builtins = dict(builtins or {})
    values = dict(declared)
    for name in values:
        check_name(name, where)
        if name in builtins:
            raise DiffeatError(f"{where}: vars.{name} is a built-in variable; choose another name")
        env = environ.get(ENV_PREFIX + name.upper())
        if env is not None:
            values[name] = parse_value(env)
    for name, value in overrides.items():
        if name not in values:
            known = ", ".join(sorted(values)) or "none"
            raise DiffeatError(f"--set {name}=...: {where} declares no variable {name!r} (its variables: {known}; "
                               "stage options are set as STAGE.KEY=VALUE)")
        values[name] = value
    values.update(builtins)
    return values


class Resolver:
    """Resolves ``${name}`` references against a set of variables (lazily, with cycle detection)."""

    def __init__(self, raw: Mapping[str, Any], where: str = "pipeline") -> None:
        self.raw = dict(raw)
        self.where = where
        self._done: dict[str, Any] = {}
        self._active: list[str] = []

    def child(self, extra: Mapping[str, Any]) -> Resolver:
        """A resolver that also knows ``extra`` (a ``foreach`` item's keys), which take precedence."""
        return Resolver({**self.raw, **extra}, self.where)

    def var(self, name: str, context: str) -> Any:
        """The resolved value of variable ``name``; ``context`` names the place that asked, for errors."""
        if name in self._done:
            return self._done[name]
        if name not in self.raw:
            known = ", ".join(sorted(self.raw)) or "none"
            raise DiffeatError(f"{self.where}: {context} uses ${{{name}}}, which is not a variable (known: {known})")
        if name in self._active:
            cycle = " -> ".join([*self._active[self._active.index(name):], name])
            raise DiffeatError(f"{self.where}: variables refer to each other in a cycle: {cycle}")
        if self.raw[name] is None:
            raise DiffeatError(
                f"{self.where}: {context} needs variable {name!r}, which has no value: pass --set {name}=VALUE "
                f"or set the environment variable {ENV_PREFIX}{name.upper()}")
        self._active.append(name)
        try:
            value = self.resolve(self.raw[name], f"vars.{name}")
        finally:
            self._active.pop()
        self._done[name] = value
        return value

    def resolve(self, value: Any, context: str) -> Any:
        """``value`` with every ``${name}`` replaced, recursing into lists and mappings."""
        if isinstance(value, str):
            whole = _REF.fullmatch(value)
            if whole and whole.group(1) is not None:
                return self.var(whole.group(1).strip(), context)

            def sub(m: re.Match) -> str:
                if m.group(0) == "$$":
                    return "$"
                v = self.var(m.group(1).strip(), context)
                if isinstance(v, (list, dict)):
                    raise DiffeatError(f"{self.where}: {context} puts ${{{m.group(1)}}} (a {type(v).__name__}) "
                                       "inside a longer string; use it as the whole value")
                return str(v)

            return _REF.sub(sub, value)
        if isinstance(value, list):
            return [self.resolve(v, f"{context}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{context}.{k}") for k, v in value.items()}
        return value
