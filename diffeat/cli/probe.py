"""``diffeat probe``: train heads (linear, MLP, CNN, attention) and reference evaluators on cached features."""

from __future__ import annotations

import click

from diffeat.cli.options import (
    JSON_OBJECT,
    STORAGE_OPTIONS_HELP,
    echo_json,
    parse_int_list,
)

HEAD_NAMES = ("linear", "mlp", "cnn", "attention", "knn", "logistic")  # checked again by the library registry
RECIPES = ("lbfgs", "paper")  # diffeat.probe.config.RECIPES (not imported: --help stays instant)

#: Per-head flags, folded into the record's ``head_options`` field: parameter -> (head, option).
HEAD_FLAGS = {"linear_bn": ("linear", "batchnorm"), "mlp_hidden": ("mlp", "hidden"), "cnn_width": ("cnn", "width"),
              "cnn_depth": ("cnn", "depth"), "attn_dim": ("attention", "dim"), "attn_depth": ("attention", "depth"),
              "attn_heads": ("attention", "heads")}


def _floats(values: tuple[str, ...], option: str) -> list[float] | None:
    """Floats from repeated or comma-separated values (``--lr 0.01,0.1 --lr 1``); None when not given."""
    out: list[float] = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise click.BadParameter(f"{part!r} is not a number", param_hint=option) from None
    return out or None


@click.command()
@click.option("--store", required=True, help="Feature store: a path or fsspec URL (opened read-only).")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--scheduler", help="A dask scheduler (tcp://host:8786) for the statistics pass of splits "
              "streamed from the store; training stays in this process.")
@click.option("--workers", type=int, help="... or a local dask cluster of this many processes.")
@click.option("--dataset", required=True, help="Dataset whose features to probe.")
@click.option("--model", help="Model of the features (needed only when the store holds several).")
@click.option("--block", "blocks", multiple=True, help="Block(s): 24, 19,24 or 20-24; repeatable. "
              "Omitted: the single block the store holds.")
@click.option("--t", "ts", multiple=True, help="Timestep(s), as --block.")
@click.option("--pool", "pools", multiple=True, help="Pool size(s) k, as --block.")
@click.option("--name", help="Probe an imported feature set (diffeat import --name) instead of block/t/pool.")
@click.option("--head", "heads", multiple=True, metavar="HEAD",
              help=f"Head(s) to train, repeatable: {', '.join(HEAD_NAMES)} [default: linear]. Trained heads "
              "share one pass over the data.")
@click.option("--recipe", type=click.Choice(RECIPES), default="lbfgs", show_default=True,
              help="How the linear head is trained: lbfgs (full-batch L-BFGS logistic regression, C chosen on "
              "validation along a warm-started path, refit) or paper (the one-pass SGD grid over lr x wd).")
@click.option("--train-split", help="Split to train on [default: the dataset's standard pair among the stored "
              "splits: train/test, trainval/test for flowers and aircraft, train/val for imagenet ...].")
@click.option("--test-split", help="Split to test on [default: as --train-split].")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Fraction of each class of the train split held out to choose hyperparameters.")
@click.option("--lr", "lrs", multiple=True, help="Learning rates of the grid (default: per head, see docs).")
@click.option("--wd", "wds", multiple=True, help="Weight decays of the grid (default: per head).")
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--min-steps", default=1000, show_default=True, type=int,
              help="Train at least this many steps (more epochs on small datasets).")
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--standardize", type=click.Choice(["feature", "channel", "none"]), default="feature",
              show_default=True, help="Z-score with train statistics per feature, per channel, or not at all.")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Retrain the chosen hyperparameters on train + val before the test.")
@click.option("--linear-bn", is_flag=True, help="linear: BatchNorm1d without affine in front (for --standardize none).")
@click.option("--mlp-hidden", help="mlp: hidden widths, e.g. 2048 or 2048,1024 [default: 2048].")
@click.option("--cnn-width", type=int, help="cnn: channels per conv layer [default: 256].")
@click.option("--cnn-depth", type=int, help="cnn: conv layers [default: 2].")
@click.option("--attn-dim", type=int, help="attention: token width [default: 1024].")
@click.option("--attn-depth", type=int, help="attention: transformer blocks [default: 2].")
@click.option("--attn-heads", type=int, help="attention: attention heads [default: 8].")
@click.option("--knn-k", default=20, show_default=True, type=int, help="knn: neighbours.")
@click.option("--knn-t", "knn_temperature", default=0.07, show_default=True, type=float, help="knn: temperature.")
@click.option("--C", "cs", multiple=True, help="logistic, and linear with --recipe lbfgs: C values to search "
              "[default: 1e-5 ... 10].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--memory-budget", help="RAM a split may take before it is streamed from the store, e.g. 8G "
              "[default: 60% of available memory].")
@click.option("--threads", type=int, help="CPU threads for torch and BLAS [default: one less than the CPUs, 1 in a dask worker].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Results directory (a run folder with results.csv, run.json and heads/ is created in it).")
@click.option("--save-weights/--no-save-weights", default=True, show_default=True)
@click.option("--progress/--no-progress", default=None, help="A progress bar per setting (default: on a "
              "terminal; a log line every 30 s otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (a list of results) instead of text.")
def probe(as_json, linear_bn, mlp_hidden, cnn_width, cnn_depth, attn_dim, attn_depth, attn_heads, **options):
    """Train heads on cached features; choose hyperparameters on validation; test once.

    Never writes to the store. Results go to OUT/probe-<time>-<id>/ (results.csv in
    long format, run.json with the resolved config and versions, heads/*.safetensors).

    \b
    Examples:
      diffeat probe --store feats.zarr --dataset cub --block 24 --t 90 --pool 2 --head linear
      diffeat probe --store feats.zarr --dataset cub --block 24 --t 90 --pool 4 --head attention --device cuda
      diffeat probe --store feats.zarr --dataset cub --block 24 --t 90 --head linear --head mlp --head knn --json
    """
    from diffeat.probe import ProbeConfig, run_probe

    options["heads"] = list(options["heads"]) or ["linear"]
    for name, flag in (("blocks", "--block"), ("ts", "--t"), ("pools", "--pool")):
        options[name] = parse_int_list(options[name], flag)
    for name, flag in (("lrs", "--lr"), ("wds", "--wd"), ("cs", "--C")):
        options[name] = _floats(options[name], flag)
    given = {"linear_bn": True if linear_bn else None,
             "mlp_hidden": parse_int_list((mlp_hidden,), "--mlp-hidden") if mlp_hidden else None,
             "cnn_width": cnn_width, "cnn_depth": cnn_depth, "attn_dim": attn_dim, "attn_depth": attn_depth,
             "attn_heads": attn_heads}
    head_options: dict[str, dict] = {}
    for param, value in given.items():
        if value is None:
            continue
        head, key = HEAD_FLAGS[param]
        if head not in options["heads"]:
            flag = "--" + param.replace("_", "-")
            raise click.BadParameter(f"{flag} is an option of the {head} head, which is not asked for "
                                     f"(add --head {head})", param_hint=flag)
        head_options.setdefault(head, {})[key] = value
    report = run_probe(ProbeConfig(**options, head_options=head_options))
    if as_json:
        echo_json(report.summaries())
        return
    _print_table(report)


def _print_table(report) -> None:
    """A short fixed-width table: one line per (setting, head)."""
    from diffeat.store.layout import setting_label

    rows = [("model", "setting", "head", "top1", "top5", "val_top1", "chosen", "seconds")]
    for r in report.results:
        setting = setting_label(r.block, r.t, r.pool, r.name)
        hp = r.hparams
        chosen = (f"lr={hp['lr']:g} wd={hp['wd']:g}" if "lr" in hp else f"C={hp['C']:g}" if "C" in hp
                  else f"k={hp.get('k')}")
        rows.append((str(r.model), setting, r.head, f"{100 * r.test['top1']:.2f}", f"{100 * r.test['top5']:.2f}",
                     f"{100 * r.val['top1']:.2f}", chosen, f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) if i < 3 or i == 6 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    click.echo(f"accuracies in %; results in {report.run_dir}")
