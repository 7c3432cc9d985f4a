"""``diffeat ls``: list the feature settings in a store."""

from __future__ import annotations

import click

from diffeat.cli.options import echo_json, storage_options

JSON_FIELDS = ("model", "dataset", "split", "block", "t", "pool", "shape", "dtype", "status", "path")


@click.command()
@click.option("--store", required=True, help="Feature store: a path or fsspec URL.")
@click.option("--storage-options", "storage_opts", help="JSON of fsspec options for a remote store.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def ls(store, storage_opts, as_json):
    """List the feature settings in a store (read-only)."""
    from diffeat.store import open_store

    settings = open_store(store, mode="r", storage_options=storage_options(storage_opts)).list_settings()
    if as_json:
        echo_json([{k: v for k, v in s.as_dict().items() if k in JSON_FIELDS + ("name", "created", "created_by")}
                   for s in settings])
        return
    if not settings:
        click.echo(f"{store}: no feature settings")
        return
    click.echo(f"{'model':16s} {'dataset':10s} {'split':8s} {'setting':14s} {'shape':>20s} {'dtype':8s} status")
    for s in settings:
        shape = "x".join(map(str, s.shape))
        click.echo(f"{s.model:16s} {s.dataset:10s} {s.split:8s} {s.label():14s} {shape:>20s} {s.dtype:8s} {s.status}")
