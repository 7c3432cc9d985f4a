"""``diffeat env``: versions and devices, for bug reports."""

from __future__ import annotations

import click

from diffeat.cli.options import echo_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def env(as_json):
    """Print diffeat, Python, library versions and the devices torch sees."""
    from diffeat.runtime.envinfo import environment

    info = environment()
    if as_json:
        echo_json(info)
        return
    for key, value in info.items():
        click.echo(f"{key:14s} {value}")
