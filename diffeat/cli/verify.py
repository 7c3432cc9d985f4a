"""``diffeat verify``: read every chunk of a store and check ledger and provenance."""

from __future__ import annotations

import sys

import click

from diffeat.cli.options import JSON_OBJECT, STORAGE_OPTIONS_HELP, echo_json


@click.command()
@click.option("--store", required=True, help="Feature store: a path or fsspec URL (read-only is enough).")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--setting", "settings", multiple=True, help="Only this setting: its array path, folder name or "
              "settings-hash prefix (repeatable; default: every setting).")
@click.option("--repair", is_flag=True, help="Unflag damaged units so that the same `diffeat extract` recomputes "
              "them, and rewrite stale catalog entries (needs write access).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(store, storage_options, settings, repair, as_json):
    """Read every chunk of a store; check checksums, completeness and provenance.

    Exits with status 1 when anything is damaged or inconsistent. Damaged units are
    recomputed by `diffeat verify --repair` followed by the same `diffeat extract`.
    """
    from diffeat.store import open_store
    from diffeat.store.verify import verify as run_verify

    fs = open_store(store, mode="a" if repair else "r", storage_options=storage_options)
    report = run_verify(fs, settings=list(settings) or None, repair=repair)
    if as_json:
        echo_json(report.as_dict())
    else:
        for s in report.settings:
            state = "ok" if s.ok else "DAMAGED" if s.damaged else "PROBLEM"
            click.echo(f"{state:8s} {s.status:12s} {s.units_written:>5}/{s.n_units:<5} units  {s.path}")
            for d in s.damaged:
                click.echo(f"         unit {d.unit} (rows {d.rows[0]}-{d.rows[1] - 1}): {d.problem}")
            for p in s.problems:
                click.echo(f"         {p}")
        n_bad = sum(not s.ok for s in report.settings)
        mb = sum(s.bytes_read for s in report.settings) / 2**20
        click.echo(f"{len(report.settings)} settings checked, {n_bad} with problems, {mb:.1f} MiB read in "
                   f"{report.seconds:.1f} s" + ("; repaired: run the same `diffeat extract` again" if repair and
                                                 n_bad else ""))
    if not report.ok:
        sys.exit(1)
