"""`diffeat convert-adm`: turn a guided-diffusion checkpoint into a diffusers model folder."""

from __future__ import annotations

from pathlib import Path

import click

from diffeat.cli.options import echo_json

_DTYPES = ("float32", "float16", "bfloat16")


@click.command("convert-adm")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--image-size", type=int, default=256, show_default=True, help="Resolution the model was trained at.")
@click.option(
    "--num-head-channels",
    type=int,
    default=64,
    show_default=True,
    help="Channels per attention head (guided-diffusion's --num_head_channels; not stored in checkpoints).",
)
@click.option(
    "--new-attention-order",
    is_flag=True,
    help="The model was trained with --use_new_attention_order True (e.g. ADM-64). "
    "Default: guided-diffusion's legacy qkv order, used by every 256x256 checkpoint.",
)
@click.option(
    "--dtype", type=click.Choice(_DTYPES), default="float32", show_default=True, help="Dtype of the weights written."
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it already holds files.")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion record as JSON.")
def convert_adm(
    checkpoint: Path,
    output_dir: Path,
    image_size: int,
    num_head_channels: int,
    new_attention_order: bool,
    dtype: str,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Convert a guided-diffusion (ADM) CHECKPOINT (.pt) into a diffusers UNet2DModel folder OUTPUT_DIR.

    The architecture is read from the tensors; the result loads with
    `UNet2DModel.from_pretrained(OUTPUT_DIR)` and `diffeat ... --model OUTPUT_DIR`.
    The checkpoint is read with torch.load(weights_only=True): no code in it runs.
    """
    import torch

    from diffeat.models.adm import convert_adm_checkpoint, read_conversion_record

    # a ModelError (not a checkpoint, unsupported layout) is printed by the `diffeat` group
    out = convert_adm_checkpoint(
        checkpoint,
        output_dir,
        image_size=image_size,
        num_head_channels=num_head_channels,
        legacy_attention=False if new_attention_order else None,
        dtype=getattr(torch, dtype),
        overwrite=overwrite,
    )
    record = read_conversion_record(out) or {}
    if as_json:
        echo_json({"output_dir": str(out), **record})
        return
    args = record.get("guided_diffusion_args", {})
    click.echo(f"converted {checkpoint} -> {out}")
    click.echo(f"  source sha256   {record.get('source', {}).get('sha256')}")
    click.echo(f"  parameters      {record.get('parameters', 0):,} ({record.get('dtype')})")
    click.echo(
        f"  architecture    model_channels {args.get('model_channels')}, channel_mult {args.get('channel_mult')}, "
        f"{args.get('num_res_blocks')} res blocks, attention at resolutions {args.get('attention_resolutions')}, "
        f"classes {args.get('num_classes')}, learn_sigma {args.get('learn_sigma')}"
    )
    click.echo(f"  qkv order       {record.get('qkv_order')}")
    click.echo(f"use it with: diffeat blocks --model {out}")
