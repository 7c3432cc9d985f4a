"""``diffeat blocks``: the computed block table of a model."""

from __future__ import annotations

import click

from diffeat.cli.options import echo_json


@click.command()
@click.option("--model", required=True, help="diffusers folder or pipeline folder, transformers vision backbone "
              "folder, built-in name, random:<arch>, or a cached hub id.")
@click.option("--resolution", type=int, help="Input resolution in pixels (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {block, module, channels, height, width}.")
def blocks(model, resolution, as_json):
    """Show what block N is: module, channels and resolution.

    U-Nets are numbered 1-based, as in the paper; diffusion transformers from 0 (the patch
    embedding) to their depth; vision backbones (ResNet, ViT, DINOv2, CLIP) as their
    hidden_states: 0 the stem or patch embedding, N stage or layer N. Latent models' shapes
    are in latent space. A `random:<arch>` is built on the meta device (no memory).
    """
    from diffeat.extract.config import MAX_RESOLUTION
    from diffeat.models.loading import load_model

    if resolution is not None and not 1 <= resolution <= MAX_RESOLUTION:
        raise click.BadParameter(f"{resolution} is invalid: 1..{MAX_RESOLUTION} px", param_hint="--resolution")
    loaded = load_model(model, device="meta")
    table = loaded.model.block_table(resolution)
    if as_json:
        echo_json([{"block": b.index, "module": b.module, "adm_name": b.adm_name, "channels": b.channels,
                    "height": b.height, "width": b.width} for b in table])
        return
    res = resolution or loaded.resolution
    click.echo(f"{loaded.name} ({loaded.family}): {len(table)} blocks at {res} px")
    click.echo(f"{'block':>5}  {'ADM name':16s} {'diffusers module':30s} {'C x H x W':>16s}")
    for b in table:
        click.echo(f"{b.index:>5}  {b.adm_name or '-':16s} {b.module:30s} "
                   f"{f'{b.channels}x{b.height}x{b.width}':>16s}")
