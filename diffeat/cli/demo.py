"""``diffeat demo``: the built-in model on the built-in dataset, extract -> probe -> CKA -> report, on a CPU."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", default="diffeat-demo", show_default=True, type=click.Path(file_okay=False),
              help="Report folder (features.zarr, probe runs, accuracy.png, cka.png, results.csv, summary.md).")
@click.option("--model", help="Another model instead of digits-ddpm, e.g. random:digits-ddpm (same network, random "
              "weights) for a baseline.")
@click.option("--force", is_flag=True, help="Run every stage again, even when its outputs are current.")
@click.option("--threads", default=1, show_default=True, type=int,
              help="torch CPU threads. The demo's model is tiny: one thread is as fast, and does not stall when "
              "other jobs share the cores.")
def demo(out, model, force, threads):
    """Extract, probe and compare digits-ddpm features of every block on digits.

    Writes OUT/summary.md (which block and t won), OUT/accuracy.png (block x t
    heatmap), OUT/cka.png (CKA between blocks) and OUT/results.csv. Takes about
    two minutes on a laptop CPU; a re-run reuses the cached features and results.
    """
    import logging

    from diffeat.cli.run import describe
    from diffeat.pipelines.demo import run_demo

    if threads < 1:
        raise click.BadParameter("must be at least 1", param_hint="--threads")
    if not click.get_current_context().find_root().params.get("verbose"):
        # The stage lines below say what happens; per-setting log lines (-v) would bury the result.
        logging.getLogger("diffeat").setLevel(logging.WARNING)
    result = run_demo(out, model=model, force=force, overrides={"threads": threads},
                      on_stage=lambda o: click.echo(describe(o)))
    best = result.best
    click.echo(f"best: block {best['block']}, t {best['t']}: {100 * best['test']:.1f}% test top-1 "
               f"({best['model']}, linear probe, pool {best['pool']})")
    click.echo(f"report: {result.summary}  ({result.report.seconds:.1f} s)")
