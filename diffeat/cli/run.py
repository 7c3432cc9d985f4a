"""``diffeat run``: run a pipeline file (extract, probe, cka, report stages), skipping what is current."""

from __future__ import annotations

import click

from diffeat.cli.options import echo_json


def describe(outcome) -> str:
    """One line for a stage outcome (shared with ``diffeat demo``)."""
    words = {"ran": "ran", "skipped": "skipped (outputs match its config)", "planned": "would run",
             "current": "would skip (outputs match its config)"}
    took = f" in {outcome.seconds:.1f} s" if outcome.status == "ran" else ""
    return f"{outcome.name:24s} {words.get(outcome.status, outcome.status)}{took}"


@click.command()
@click.argument("pipeline")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Set a variable (data_root=/data) or a stage option (probe.epochs=5, extract.matrix.t=[90]). "
              "Values are YAML. Repeatable. Variables also come from DIFFEAT_VAR_<NAME>.")
@click.option("--stage", "stages", multiple=True, help="Run only this stage (and the stages it needs). Repeatable.")
@click.option("--force", is_flag=True, help="Run stages even when their outputs match their config.")
@click.option("--dry-run", is_flag=True, help="Resolve everything and say what would run; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome of every stage as JSON.")
def run(pipeline, assignments, stages, force, dry_run, as_json):
    """Run PIPELINE (a YAML file, or `demo`) stage by stage.

    A stage is skipped when the record next to its outputs has the same resolved
    config and its outputs still exist; change an option and that stage, and the
    stages that need it, run again.

    \b
    Examples:
      diffeat run pipelines/imagenet_linear.yaml --set data_root=/data/imagenet --set model=/models/adm256
      diffeat run pipelines/ablation_block_t.yaml --set data_root=/data/CUB_200_2011 --stage probe --dry-run
    """
    from diffeat.pipelines import load_pipeline, parse_assignments, run_pipeline

    spec = load_pipeline(pipeline, parse_assignments(assignments))
    on_stage = None if as_json else (lambda outcome: click.echo(describe(outcome)))
    report = run_pipeline(spec, stages=list(stages) or None, force=force, dry_run=dry_run, on_stage=on_stage)
    if as_json:
        echo_json({"pipeline": report.pipeline, "seconds": round(report.seconds, 3),
                   "stages": [s.as_dict() for s in report.stages]})
        return
    ran = sum(s.status == "ran" for s in report.stages)
    click.echo(f"{report.pipeline}: {ran} stage(s) ran, {len(report.stages) - ran} "
               f"{'planned or current' if dry_run else 'skipped'}, {report.seconds:.1f} s")
