"""Option parsers shared by several commands (one definition each)."""

from __future__ import annotations

import json

import click


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
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not an integer or a range like 1-37", param_hint=option)
    return out


def storage_options(value: str | None) -> dict | None:
    """Parse ``--storage-options JSON`` (fsspec keyword arguments for remote stores)."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint="--storage-options")
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return parsed


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
