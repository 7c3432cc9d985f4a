"""``diffeat extract``: images -> frozen diffusion model -> pooled block features -> feature store."""

from __future__ import annotations

import click

from diffeat.cli.options import (
    BATCH_SIZE,
    JSON_OBJECT,
    STORAGE_OPTIONS_HELP,
    echo_json,
    parse_int_list,
)


@click.command()
@click.option("--dataset", required=True, help="Dataset layout: cub, nabirds, flowers, aircraft, cars, dogs, "
              "imagefolder, imagenet, digits (built in).")
@click.option("--root", type=click.Path(file_okay=False), help="Dataset root folder (not needed for digits).")
@click.option("--model", required=True, help="diffusers U-Net or pipeline folder (any family: pixel or latent "
              "U-Net, DiT, PixArt, SD3), a transformers vision backbone folder (ResNet, ConvNeXt, ViT, DINOv2, CLIP), "
              "built-in name, random:<arch>, or a cached hub id. Never downloads.")
@click.option("--block", "blocks", multiple=True, required=True, help="Block number(s), 1-based as in the paper; "
              "transformers 0 (patch embedding / stem) .. depth (repeat, or 19,24, or 20-30; `diffeat blocks` lists "
              "them).")
@click.option("--t", "ts", multiple=True, help="The model's training timestep(s) 0..999, noised with its own "
              "schedule (repeat or comma list). Required for diffusion models; vision backbones take none.")
@click.option("--pool", "pools", multiple=True, default=("1",), show_default=True,
              help="Adaptive average pool size(s) k (features are C x k x k).")
@click.option("--store", required=True, help="Feature store: a path or fsspec URL (s3://bucket/prefix).")
@click.option("--storage-options", type=JSON_OBJECT, help=STORAGE_OPTIONS_HELP)
@click.option("--split", "splits", multiple=True, help="Split(s) to extract (default: the dataset's standard "
              "train and test splits; 'all' for every split).")
@click.option("--classes", type=click.Path(dir_okay=False, exists=True), help="imagenet only: file of wnids to keep.")
@click.option("--limit", type=int, help="Only the first N samples of each split (a dry run).")
@click.option("--resolution", type=int, help="Input resolution in pixels (default: the model's; latent models: "
              "the denoiser's latent size x the VAE's factor, e.g. 512 for SD-1.5).")
@click.option("--batch-size", default="auto", show_default=True, type=BATCH_SIZE,
              help="Images per batch, or auto: the largest power of two that fits GPU memory (32 on CPU).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute precision of the U-Net.")
@click.option("--store-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Precision of the stored features.")
@click.option("--num-workers", type=int, help="Loader worker processes (default: auto).")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed (noise is per sample id and t).")
@click.option("--noise-draws", default=1, show_default=True, type=int, help="Average features over this many "
              "noise draws.")
@click.option("--chunk-rows", type=int, help="Rows per stored chunk (a power of two; default: ~2 MiB chunks, "
              "64 MiB shards). Smaller chunks mean smaller units of work for many writers.")
@click.option("--scheduler", help="Run on this dask.distributed scheduler (tcp://host:8786): whole units of every "
              "setting are spread over its workers.")
@click.option("--workers", type=int, help="Run on a local dask cluster of this many worker processes.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="When other writers hold units of these "
              "settings, wait for them (taking over any whose claim expires) before returning.")
@click.option("--compile/--no-compile", default=None, help="torch.compile the truncated forward "
              "(default: on CUDA only; compiling takes a minute once per run).")
@click.option("--progress/--no-progress", default=None, help="A progress bar (default: on a terminal; log lines "
              "otherwise).")
@click.option("--on-bad-image", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="An image that cannot be decoded: fail (one line naming the file; finished units are kept) "
              "or skip (its row is stored as NaN, its id and reason recorded; probe and CKA leave it out).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def extract(as_json, **options):
    """Extract pooled block features of a dataset into a feature store.

    One forward pass per batch and t captures every --block and stops after the
    deepest; settings already complete in the store are skipped, interrupted ones
    resume.

    \b
    Examples:
      diffeat extract --dataset cub --root /data/CUB_200_2011 --model /models/adm256 \\
          --block 24 --t 90 --t 150 --pool 1 --pool 2 --store feats.zarr
      diffeat extract --dataset cub --root /data/CUB_200_2011 --model microsoft/resnet-50 \\
          --block 0-4 --store feats.zarr          # a baseline: no --t
    """
    from diffeat.extract import ExtractConfig, run_extract

    for name, flag in (("blocks", "--block"), ("ts", "--t"), ("pools", "--pool")):
        options[name] = parse_int_list(options[name], flag)
    report = run_extract(ExtractConfig(**options))
    if as_json:
        echo_json(report.as_dict())
        return
    for s in report.settings:
        t = "" if s.t is None else f" t {s.t:>3}"
        click.echo(f"{s.outcome:10s} {s.split:8s} block {s.block:>2}{t} pool {s.pool}  "
                   f"{'x'.join(map(str, s.shape)):>18}  {s.path}")
    if report.skipped:
        ids = ", ".join(s["id"] for s in report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else "")
        click.echo(f"{len(report.skipped)} images could not be decoded and were skipped (NaN rows, recorded in "
                   f"the settings): {ids}")
    if report.images:
        click.echo(f"{report.images} images in {report.seconds:.1f} s ({report.images_per_second:.1f} img/s)")
    else:
        click.echo("all settings cached: no forward pass needed")
