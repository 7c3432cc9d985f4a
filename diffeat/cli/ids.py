"""``diffeat ids``: a dataset split's sample table (id, path, label) in feature-row order, as CSV or JSON.

What to compute external features in: row i of every feature array of that split is the
sample in row i here. Read from a store when it holds the table, else from the dataset.
"""

from __future__ import annotations

import click

from diffeat.cli.options import JSON_OBJECT, STORAGE_OPTIONS_HELP, echo_json


@click.command()
@click.option("--dataset", required=True, help="Dataset name (as in the store, or a layout: cub, digits ...).")
@click.option("--split", "splits", multiple=True, help="Split(s) [default: every split the store holds, or the "
              "dataset's standard pair].")
@click.option("--store", help="Read the sample table from this store (path or URL).")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--root", type=click.Path(file_okay=False), help="Read the table from the dataset under this root "
              "instead (not needed for digits).")
@click.option("--classes", type=click.Path(dir_okay=False, exists=True), help="imagenet only: file of wnids to keep.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write here (.csv or .json) instead of printing CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of CSV.")
def ids(dataset, splits, store, storage_options, root, classes, out, as_json):
    """Print or write a split's sample ids, paths and labels in the order of its feature rows.

    \b
    Examples:
      diffeat ids --store feats.zarr --dataset cub --split test --out cub_test.csv
      diffeat ids --dataset cub --root /data/CUB_200_2011 --split test      # before any extraction
    """
    from diffeat.store.imports import sample_rows

    rows = sample_rows(dataset, list(splits), store=store, storage_options=storage_options, root=root,
                       classes=classes)
    if not out:
        if as_json:
            echo_json(rows)
        else:
            import io

            buffer = io.StringIO()
            _write_csv(rows, buffer)
            click.echo(buffer.getvalue(), nl=False)
        return
    with open(out, "w", newline="") as f:
        if out.endswith(".json") or as_json:
            import json

            json.dump(rows, f, indent=1)
        else:
            _write_csv(rows, f)
    click.echo(f"wrote {len(rows)} rows to {out}")


def _write_csv(rows: list[dict], stream) -> None:
    import csv

    writer = csv.DictWriter(stream, fieldnames=["split", "row", "id", "path", "label", "class_name"])
    writer.writeheader()
    writer.writerows(rows)
