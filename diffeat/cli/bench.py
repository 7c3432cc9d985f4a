"""``diffeat bench``: extraction throughput (forward alone, the whole loop, the naive baseline) in one run."""

from __future__ import annotations

import click

from diffeat.cli.options import BATCH_SIZE, echo_json


def _size(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x384", param_hint="--image-size")
    if width < 1 or height < 1:
        raise click.BadParameter(f"{value!r}: both sides must be >= 1", param_hint="--image-size")
    return width, height


@click.command()
@click.option("--arch", default="adm256", show_default=True,
              help="Architecture built with random weights (cost is the checkpoint's): adm256, sd15-unet (512 px), "
              "dit-xl2 (256 px), resnet50, vit-b16 (baselines, 224 px), tiny ... (docs/models.md#random-architectures)")
@click.option("--model", help="A real model instead of --arch: diffusers folder, built-in name or cached hub id.")
@click.option("--block", type=int, help="Block, 1-based as in the paper (transformers: 0..depth) [default: 24 on "
              "ADM-sized U-Nets, else the middle block, or transformer block depth/2].")
@click.option("--t", "t", default=90, show_default=True, type=int, help="Diffusion timestep (not used by vision "
              "backbones: random:resnet50, random:vit-b16 ...).")
@click.option("--batch-size", default="auto", show_default=True, type=BATCH_SIZE,
              help="Images per batch, or auto (largest power of two that fits GPU memory; 32 on CPU).")
@click.option("--resolution", type=int, help="Input resolution [default: the model's].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Compute dtype [default: bfloat16 on CUDA, float32 on CPU].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--images", type=int, help="JPEG files the loop benchmark writes and extracts [default: 8 batches, "
              "at least 64; with --batch-size auto 2048 on CUDA, 256 on CPU].")
@click.option("--image-size", help="WIDTHxHEIGHT of those files [default: 2x by 1.5x the resolution, "
              "ImageNet-like].")
@click.option("--warmup", default=3, show_default=True, type=int, help="Untimed iterations first.")
@click.option("--iters", default=10, show_default=True, type=int, help="Timed iterations (the median is reported).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the truncated forward [default: on CUDA only].")
@click.option("--num-workers", type=int, help="Loader processes in the loop [default: auto].")
@click.option("--ablation", is_flag=True, help="Also time the forward as each optimisation is added.")
@click.option("--peak-tflops", type=float, help="The device's dense bf16 peak, if diffeat does not know the card.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(arch, model, block, t, batch_size, resolution, dtype, device, images, image_size, warmup, iters, compile_,
          num_workers, ablation, peak_tflops, as_json):
    """Measure extraction throughput: forward alone, the whole loop, and the naive baseline.

    \b
    Example (the paper's setting, no checkpoint needed):
      diffeat bench --arch adm256 --block 24 --t 90 --device cuda
    """
    from diffeat.extract.bench import bench as run_bench

    result = run_bench(arch=arch, model=model, block=block, t=t, batch_size=batch_size, resolution=resolution,
                       dtype=dtype, device=device, images=images, image_size=_size(image_size), warmup=warmup,
                       iters=iters, compile=compile_, num_workers=num_workers, ablation=ablation, peak=peak_tflops)
    if as_json:
        echo_json(result)
        return
    click.echo(format_result(result))


def format_result(r: dict) -> str:
    """A human-readable report of a ``diffeat.extract.bench.bench`` result."""
    peak = (f", {100 * r['fraction_of_peak']:.0f}% of the card's {r['peak_tflops']:.0f} dense bf16"
            if r["fraction_of_peak"] is not None else "")
    shape = "x".join(map(str, r["block_shape"]))
    ratios = r["ratios"]
    loop = r["loop"]
    at_t = "" if r["t"] is None else f" t={r['t']}"  # vision backbones have no t
    lines = [
        f"{r['model']} block {r['block']} ({r['module']}, {shape}){at_t} at {r['resolution']} px on {r['device']}",
        (f"dtype {r['dtype']}, batch {r['batch_size']} (micro {r['micro_batch']}), compiled {r['compiled']}, "
         f"torch {r['torch']}, {r['threads']} threads"),
        (f"FLOPs: {r['gflop_per_image']:.2f} GFLOP/img truncated, {r['gflop_per_image_full']:.2f} full forward"
         + (f", {r['gflop_per_image_vae']:.2f} VAE encoder (in the loop only)" if r["gflop_per_image_vae"] else "")),
        "",
        f"{'':28s}{'img/s':>10s}{'best':>10s}{'CPU ms/img':>12s}{'TFLOP/s':>10s}",
        _phase("forward (truncated)", r["forward"], r["achieved_tflops"]) + peak,
        _phase("whole extract loop", loop, r["loop_tflops"]),
        _phase("naive (full fp32 + hook)", r["naive"], r["naive_tflops"]) + f"   (batch {r['naive']['batch_size']})",
        "(img/s: median call, or median loop round; best: fastest; phases alternated, see docs/performance.md)",
        "",
        (f"loop / forward {ratios['loop_over_forward']:.2f} (CPU {ratios['loop_over_forward_cpu']:.2f})   "
         f"forward / naive {ratios['forward_over_naive']:.2f} (CPU {ratios['forward_over_naive_cpu']:.2f})   "
         f"loop / naive {ratios['loop_over_naive']:.2f}"),
        (f"loop: {r['images']} JPEGs {r['image_size'][0]}x{r['image_size'][1]}, {loop['num_workers']} workers; "
         f"end to end {loop['images_per_s_end_to_end']:.1f} img/s ({loop['seconds_end_to_end']:.1f} s with model "
         "load and start-up)"),
    ]
    if r["cosine"] is not None:
        c = r["cosine"]
        lines.append(f"{r['dtype']} vs float32 features: min per-sample cosine {c['min']:.5f} "
                     f"(pooled {c['min_pooled']:.5f}) over {c['samples']} samples: "
                     f"{'ok' if c['passed'] else 'BELOW 0.999'}")
    if r["ablation"]:
        lines += ["", "forward img/s as each optimisation is added:"]
        base = r["ablation"][0]["images_per_s"]
        for row in r["ablation"]:
            mem = f"  {row['peak_memory_mib']:.0f} MiB" if row.get("peak_memory_mib") else ""
            lines.append(f"  {row['step']:40s}{row['images_per_s']:>10.1f}  x{row['images_per_s'] / base:.2f}{mem}")
    return "\n".join(lines)


def _phase(name: str, p: dict, tflops: float) -> str:
    return (f"{name:28s}{p['images_per_s']:>10.1f}{p['images_per_s_best']:>10.1f}{1000 * p['cpu_s_per_image']:>12.2f}"
            f"{tflops:>10.3f}")
