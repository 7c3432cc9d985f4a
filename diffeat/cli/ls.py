"""``diffeat ls``: list the feature settings in a store."""

from __future__ import annotations

import click

from diffeat.cli.options import JSON_OBJECT, STORAGE_OPTIONS_HELP, echo_json

JSON_FIELDS = ("model", "dataset", "split", "block", "t", "pool", "name", "shape", "dtype", "status", "path",
               "created", "created_by", "completed", "stored_bytes", "settings_hash")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command()
@click.option("--store", required=True, help="Feature store: a path or fsspec URL.")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def ls(store, storage_options, as_json):
    """List the feature settings in a store (read-only).

    Reads the store's catalog (one listing of `_catalog/`), so it is fast on remote
    stores; shows who created each setting, when and where, its size and status.
    """
    from diffeat.store import open_store

    settings = open_store(store, mode="r", storage_options=storage_options).list_settings()
    if as_json:
        echo_json([{k: v for k, v in s.as_dict().items() if k in JSON_FIELDS} for s in settings])
        return
    if not settings:
        click.echo(f"{store}: no feature settings")
        return
    click.echo(f"{'model':16s} {'dataset':10s} {'split':8s} {'setting':14s} {'shape':>20s} {'dtype':8s} "
               f"{'status':11s} {'size':>10s}  created")
    for s in settings:
        shape = "x".join(map(str, s.shape))
        who = s.created_by.get("user", "?") + "@" + s.created_by.get("host", "?") if s.created_by else "-"
        click.echo(f"{s.model:16s} {s.dataset:10s} {s.split:8s} {s.label():14s} {shape:>20s} {s.dtype:8s} "
                   f"{s.status:11s} {_size(s.stored_bytes):>10s}  {s.created or '-'} {who}")
