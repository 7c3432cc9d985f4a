"""Option parsers shared by several commands (one definition each)."""

from __future__ import annotations

import json

import click

#: Most values one option may expand to (``--t 0-999`` is 1,000): a typo such as ``--block 1-30000000``
#: is refused at once instead of building a 30-million-element list (measured: 56 s and 3 GB).
MAX_VALUES = 4096


def parse_int_list(values: tuple[str, ...], option: str) -> list[int]:
    """Integers from repeated or comma-separated values, with ranges: ``--block 24 --block 19,20 --block 1-3``."""
    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                    count = int(hi) - int(lo) + 1
                    if count > MAX_VALUES - len(out):
                        raise click.BadParameter(f"{part!r} is a range of {count} values: at most {MAX_VALUES} "
                                                 "values in all", param_hint=option)
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not an integer or a range like 1-37", param_hint=option)
            if len(out) > MAX_VALUES:
                raise click.BadParameter(f"more than {MAX_VALUES} values", param_hint=option)
    return out


def echo_json(obj: object) -> None:
    """Print one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, default=str))


class BatchSizeType(click.ParamType):
    """``--batch-size``: an integer >= 1, or ``auto`` (the largest batch that fits GPU memory)."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif str(value).strip().lower() == "auto":
            return "auto"
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not an integer >= 1 or 'auto'", param, ctx)
        if number < 1:
            self.fail(f"{number} is invalid: it must be an integer >= 1 or 'auto'", param, ctx)
        return number


#: Shared by every command with a --batch-size that accepts "auto".
BATCH_SIZE = BatchSizeType()


class JsonObjectType(click.ParamType):
    """A JSON object given on the command line (``--storage-options '{"anon": true}'``)."""

    name = "JSON"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            self.fail(f"not valid JSON: {e}", param, ctx)
        if not isinstance(parsed, dict):
            self.fail("must be a JSON object", param, ctx)
        return parsed


#: ``--storage-options JSON``: fsspec keyword arguments for a remote store (every command with --store).
JSON_OBJECT = JsonObjectType()

STORAGE_OPTIONS_HELP = "JSON of fsspec options for a remote store (credentials, endpoint_url ...)."


class HiddenAliases(click.Option):
    """An option whose later spellings still work but are left out of ``--help`` (renamed options).

    ``@click.option("--memory-budget", "--memory", "memory_budget", cls=HiddenAliases)``: help
    shows ``--memory-budget`` only; ``--memory`` is accepted as before.
    """

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        if record is None:
            return None
        shown = self.opts[0] + ("" if self.is_flag else f" {self.make_metavar(ctx)}")
        return shown, record[1]


#: CLI parameters that shape what a command prints, not what it computes: not fields of its record.
OUTPUT_PARAMS = frozenset({"as_json"})
