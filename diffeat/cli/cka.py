"""``diffeat cka``: CKA between cached feature settings (a pair, or a matrix with a heatmap)."""

from __future__ import annotations

import math

import click

from diffeat.cli.options import (
    JSON_OBJECT,
    STORAGE_OPTIONS_HELP,
    HiddenAliases,
    echo_json,
    parse_int_list,
)


@click.command()
@click.option("--store", required=True, help="Feature store: a path or fsspec URL (opened read-only).")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--dataset", required=True, help="Dataset whose features to compare.")
@click.option("--split", help="Split whose features to compare [default: the only split stored, or the test split of the standard "
              "pair among the stored splits].")
@click.option("--model", help="Model of the extracted settings that name none (needed when the store holds several; "
              "as stored, or as extract's --model was given).")
@click.option("--a", "a", multiple=True, metavar="SETTING",
              help="Row setting(s): block=24,t=90,pool=1, model=random:resnet50,block=3,pool=1 (a model without t), "
              "block=0-4 or block=* (every stored block), or an import name (name=resnet50). Repeatable.")
@click.option("--b", "b", multiple=True, metavar="SETTING",
              help="Column setting(s) (default: the rows), of any model in the store. One --a and one --b: a single "
              "CKA value.")
@click.option("--block", "--blocks", "blocks", multiple=True, cls=HiddenAliases,
              help="Row settings from a grid: blocks (1-37, 19,24 or repeated) ...")
@click.option("--t", "ts", multiple=True, help="... times timesteps (e.g. 10,90,300) ...")
@click.option("--pool", "pools", multiple=True, help="... times pool sizes.")
@click.option("--name", "names", multiple=True, help="Imported feature sets to add to the rows (repeatable).")
@click.option("--kernel", type=click.Choice(["linear", "rbf"]), default="linear", show_default=True)
@click.option("--estimator", type=click.Choice(["unbiased", "biased"]), default="unbiased", show_default=True,
              help="HSIC estimator: unbiased (≈0 for unrelated features) or biased (Kornblith 2019).")
@click.option("--route", type=click.Choice(["auto", "features", "gram", "minibatch"]), default="auto",
              show_default=True, help="auto: the faster exact route that fits --memory-budget; minibatch: Nguyen et al. "
              "2021 estimator over random batches.")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="dtype of block products (accumulators are always float64).")
@click.option("--memory-budget", "--memory", "memory_budget", cls=HiddenAliases,
              help="Memory budget, e.g. 8G (default: 60% of available memory).")
@click.option("--block-rows", type=int, help="Force the row block / Gram tile size (default: from the budget, "
              "whole stored chunks).")
@click.option("--batch-size", default=512, show_default=True, type=int, help="Minibatch route: rows per batch.")
@click.option("--passes", default=1, show_default=True, type=int, help="Minibatch route: shuffled passes.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of minibatch shuffles and --subsample.")
@click.option("--rbf-threshold", default=1.0, show_default=True, type=float,
              help="RBF bandwidth as a fraction of the median pairwise distance.")
@click.option("--subsample", type=int, help="Compare a seeded random subset of this many samples.")
@click.option("--scheduler", metavar="ADDRESS",
              help="Compute on a running dask cluster: its scheduler address (tcp://10.0.0.1:8786) or scheduler "
              "file. Workers read the store themselves, so it must be a shared path or a URL. Exact linear routes "
              "only; minibatch and RBF run here.")
@click.option("--workers", type=int, metavar="N",
              help="Compute on a local dask cluster of N worker processes (1 thread each), started for this run.")
@click.option("--threads", type=int, help="CPU threads for torch and BLAS [default: one less than the CPUs, 1 in a dask worker].")
@click.option("--out", type=click.Path(file_okay=False), help="Write cka.csv, cka.npy, cka.png and cka.json here.")
@click.option("--title", help="Title of the heatmap (default: from the settings).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def cka(as_json, **options):
    """CKA between cached feature settings: one pair, or a matrix with a heatmap.

    Never writes to the store. Settings must come from the same dataset split (their
    sample ids must match).

    \b
    Examples:
      diffeat cka --store feats.zarr --dataset cub --a block=24,t=90,pool=1 --b block=19,t=90,pool=1
      diffeat cka --store feats.zarr --dataset cub --block 1-37 --t 90 --pool 1 --out cka/
      diffeat cka --store feats.zarr --dataset cub --block 1-37 --t 90 --b resnet50 --out cka/
      diffeat cka --store feats.zarr --dataset cub --block 1-37 --t 90 --pool 1 \\
          --b "model=microsoft/resnet-50,block=*,pool=1" --out cka/
      diffeat cka --store feats.zarr --dataset cub --block 1-37 --t 90 --pool 1 --workers 8
    """
    from diffeat.cka import CkaConfig, run_cka

    for name, flag in (("blocks", "--block"), ("ts", "--t"), ("pools", "--pool")):
        options[name] = parse_int_list(options[name], flag)
    if not (options["a"] or options["blocks"] or options["ts"] or options["pools"] or options["names"]):
        raise click.UsageError("give the settings to compare: --a (and --b), or --block/--t/--pool, or --name")
    result = run_cka(CkaConfig(**options))
    pair = result.matrix.shape == (1, 1) and bool(options["b"])
    if as_json:
        doc = result.pair_json() if pair else result.matrix_json()
        echo_json({**doc, "files": result.files} if result.files else doc)
        return
    models = result.models_prefix
    if pair:
        value = f"{result.value:.4f}" if math.isfinite(result.value) else "n/a"
        click.echo(f"{models}CKA({result.row_labels[0]}, {result.col_labels[0]}) = {value}  "
                   f"[{result.kernel}, {result.estimator}, n={result.n}, route {result.route}, "
                   f"{result.seconds:.1f} s]")
    else:
        _print_matrix(result)
    for path in result.files.values():
        click.echo(f"wrote {path}")


def _print_matrix(result) -> None:
    """The matrix as a text table (wide matrices: just the shape; the CSV has the values)."""
    m = result.matrix
    models = result.models_prefix
    click.echo(f"{models}{result.kernel} CKA ({result.estimator}), n={result.n}, route {result.route}, "
               f"{m.shape[0]}×{m.shape[1]} in {result.seconds:.1f} s")
    if m.shape[1] > 12:
        return
    width = max(8, *(len(c) for c in result.col_labels))
    click.echo(" " * 14 + "".join(f"{c:>{width + 1}s}" for c in result.col_labels))
    for label, row in zip(result.row_labels, m):
        click.echo(f"{label:14s}" + "".join(f"{v:>{width + 1}.4f}" if math.isfinite(v) else f"{'n/a':>{width + 1}s}"
                                            for v in row))
    for label, why in result.undefined.items():
        click.echo(f"n/a: CKA with {label} is undefined: {why}")
