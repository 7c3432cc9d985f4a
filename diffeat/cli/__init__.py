"""The ``diffeat`` command line: a thin layer that parses options and calls library functions.

Each command lives in its own module and is imported only when it runs, so
``diffeat --help`` does not import torch. Errors a user caused
(``DiffeatError``) are printed as one clear line, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

#: command name -> "module:function", imported lazily.
COMMANDS: dict[str, str] = {
    "demo": "diffeat.cli.demo:demo",
    "run": "diffeat.cli.run:run",
    "extract": "diffeat.cli.extract:extract",
    "ls": "diffeat.cli.ls:ls",
    "blocks": "diffeat.cli.blocks:blocks",
    "convert-adm": "diffeat.cli.convert_adm:convert_adm",
    "probe": "diffeat.cli.probe:probe",
    "cka": "diffeat.cli.cka:cka",
    "import": "diffeat.cli.import_features:import_features",
    "ids": "diffeat.cli.ids:ids",
    "verify": "diffeat.cli.verify:verify",
    "env": "diffeat.cli.env:env",
    "bench": "diffeat.cli.bench:bench",
}

#: one-line help shown by ``diffeat --help`` without importing the command.
SUMMARIES: dict[str, str] = {
    "demo": "The built-in demo: digits-ddpm on digits, extract, probe, CKA, report (CPU, about a minute).",
    "run": "Run a pipeline YAML stage by stage, skipping stages whose outputs are current.",
    "extract": "Extract pooled block features of a dataset (any model family) into a feature store.",
    "ls": "List the feature settings in a store.",
    "blocks": "Show the block table of a model: what block N is.",
    "probe": "Train heads (linear, MLP, CNN, attention, kNN) on cached features.",
    "cka": "CKA between cached feature sets (a pair, or an all-pairs matrix).",
    "import": "Put externally computed features into a store, for CKA and probes.",
    "ids": "A split's sample ids, paths and labels in feature-row order (CSV or JSON).",
    "verify": "Read every chunk of a store; check checksums, completeness and provenance.",
    "convert-adm": "Convert a guided-diffusion (ADM) checkpoint to a diffusers folder.",
    "env": "Print versions and devices (for bug reports).",
    "bench": "Measure extraction throughput: forward alone, the whole loop, the naive baseline.",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUMMARIES.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        from diffeat.errors import DiffeatError

        try:
            return super().invoke(ctx)
        except DiffeatError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DIFFEAT"})
@click.version_option(package_name="diffeat")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """diffeat: pretrained diffusion models as feature extractors.

    extract features once into a Zarr store, then probe and compare them (CKA).
    """
    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a loaded 2-core machine
    # spinning threads made a digits probe 20x slower (76 s vs 3.6 s); big matmuls do not notice.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    level = int(os.environ.get("DIFFEAT_LOG_LEVEL", level)) if os.environ.get("DIFFEAT_LOG_LEVEL", "").isdigit() else level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if level > logging.DEBUG:
        # Third-party chatter (diffusers' deprecation notes) is noise for users.
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        # botocore announces where it found credentials on every S3 run.
        for name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)
