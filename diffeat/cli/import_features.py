"""``diffeat import``: put externally computed features into a store (for CKA and probes)."""

from __future__ import annotations

import click

from diffeat.cli.options import JSON_OBJECT, STORAGE_OPTIONS_HELP, echo_json


@click.command("import")
@click.argument("source")
@click.option("--store", required=True, help="Feature store: a path or fsspec URL.")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--dataset", required=True, help="Dataset the features belong to.")
@click.option("--split", required=True, help="Split the features belong to.")
@click.option("--root", type=click.Path(file_okay=False), help="The dataset's root: when nothing was extracted for "
              "the split yet, its sample table is read from there (not needed for digits).")
@click.option("--classes", type=click.Path(dir_okay=False, exists=True), help="imagenet only: file of wnids to keep.")
@click.option("--name", required=True, help="Name of the imported set (letters, digits, '.', '_', '-').")
@click.option("--model", "model", default="external", show_default=True,
              help="What produced the features (recorded; part of the store path).")
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False, exists=True),
              help="File with one sample id per line, one per source row: checked against the store's sample "
              "table and used to put the rows in its order.")
@click.option("--store-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing import of that name with different contents.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_features(source, store, storage_options, dataset, split, root, classes, name, model, ids_file,
                    store_dtype, overwrite, as_json):
    """Import SOURCE (.npy of shape (N, D) or (N, C, k, k), or a zarr array path/URL) as features NAME.

    Rows must be in the split's sample-table order (`diffeat ids` prints it), or come
    with --ids. The store needs the split's sample table: from an extraction, or read
    from the dataset with --root.

    \b
    Examples:
      diffeat import --store feats.zarr --dataset cub --split test --name resnet50 features.npy
      diffeat import --store feats.zarr --dataset cub --root /data/CUB_200_2011 --split test --name r50 r50.npy
    """
    from diffeat.store.imports import import_features as run_import
    from diffeat.store.layout import check_name

    for value, what in ((name, "import"), (model, "model"), (dataset, "dataset"), (split, "split")):
        check_name(value, what)  # before anything is opened or created
    array, described = _open_source(source)
    ids = None
    if ids_file:
        with open(ids_file) as f:
            ids = [line.strip() for line in f if line.strip()]
    # The location, not an open store: the import opens (or starts) it for writing only once every
    # value has been checked, so a refused import leaves nothing behind.
    result = run_import(store, dataset, split, name, array, attrs=described, ids=ids, model=model,
                        store_dtype=store_dtype, overwrite=overwrite, root=root, classes=classes,
                        storage_options=storage_options)
    info = result.info
    if as_json:
        echo_json({"name": info.name, "model": info.model, "dataset": info.dataset, "split": info.split,
                   "shape": list(info.shape), "dtype": info.dtype, "path": info.path, "outcome": result.outcome,
                   "reordered": result.reordered})
        return
    shape = "x".join(map(str, info.shape))
    click.echo(f"{result.outcome}: {info.name} {shape} {info.dtype} -> {info.path}"
               + (" (rows reordered to the sample table)" if result.reordered else ""))


def _open_source(source: str):
    """The array to import (memory-mapped .npy, or a zarr array) and a description for provenance."""
    import os

    import numpy as np

    from diffeat.errors import DiffeatError, first_line

    if source.endswith(".npy"):
        if not os.path.isfile(source):
            raise DiffeatError(f"SOURCE {source} does not exist")
        try:
            array = np.load(source, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DiffeatError(f"SOURCE {source} is not a plain .npy array: {first_line(e)}") from None
        return array, {"source": os.path.abspath(source), "format": "npy", "dtype": str(array.dtype)}
    import zarr

    try:
        array = zarr.open_array(source, mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises many kinds for "not an array here"
        raise DiffeatError(f"SOURCE {source} is neither a .npy file nor a zarr array ({type(e).__name__}: "
                           f"{first_line(e)})") from None
    return array, {"source": source, "format": "zarr", "dtype": str(array.dtype)}
