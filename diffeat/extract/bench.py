"""``diffeat bench``: how fast extraction runs, measured in one run, against the naive way.

Measured on one device, with the same batch size for all three rates:

* **forward**: the truncated forward alone (the model family's: ``TruncatedUNet``,
  ``TruncatedTransformer``; on a batch of model inputs already on the device, at the
  chosen dtype, channels_last on CUDA, compiled if asked), in the micro-batches the
  extract loop uses;
* **loop**: the real ``extract()`` over ``images`` JPEG files written to a temporary
  imagefolder (decode, preprocess, noise in loader workers, latent models: the VAE on
  the device, forward, pool, write to a temporary zarr store), at steady state: the
  first batch (worker start-up, compilation) is not counted, everything after it is,
  up to the last write;
* **naive**: the model's own full forward in float32 with a forward hook on the
  block's module and no early exit, no autocast, no compilation (what the paper's code does).

Plus the counted FLOPs per image of the truncated forward
(``diffeat.models.flops.count_model_flops``) and of the VAE encoder (latent models; the
loop pays it, the forward does not), the achieved TFLOP/s, the ratios, and,
when the dtype is not float32, the per-sample cosine between the block's
features at that dtype and in float32. Timings use warm-up iterations, device
synchronisation around each timed iteration, and medians.

A random-weight model (``random:adm256``, ``random:sd15-unet``, ``random:dit-xl2``, and the
baselines ``random:resnet50``, ``random:vit-b16``: no t) costs exactly what the real checkpoint
costs, so anyone can benchmark without downloading it.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from diffeat.errors import DiffeatError, ModelError
from diffeat.runtime.checks import check_choice
from diffeat.runtime.devices import resolve_device

if TYPE_CHECKING:
    from diffeat.models.families.base import FeatureModel

logger = logging.getLogger(__name__)

#: Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s, from vendor data sheets, matched on the device name.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,  # an unrecognised H100 variant: assume the lowest
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,  # fp16 only
}


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, by name (None when unknown or on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_it(fn: Callable[[], object], dev: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones (device synchronised)."""
    return [wall for wall, _ in time_calls(fn, dev, warmup, iters)]


def time_calls(fn: Callable[[], object], dev: torch.device, warmup: int, iters: int) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones.

    CPU time is this process's (all its threads): on a machine other jobs share, it shows
    the work a call costs where wall time shows how long it waited too.
    """
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(iters):
        _sync(dev)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(dev)
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def interleaved(phases: dict[str, tuple[Callable[[], object], Callable[[], None]]], dev: torch.device,
                warmup: int, iters: int, rounds: int = 3) -> dict[str, list[tuple[float, float]]]:
    """Time several phases alternately (A, B, A, B ...): ``rounds`` rounds of about ``iters / rounds`` calls each.

    ``phases`` maps a name to ``(call, setup)``; ``setup`` runs before each round of that
    phase (a memory-format switch, say). Timed one after the other, a phase that happened to
    run while another job held the cores would look slower than it is; alternated, every
    phase sees the same machine. Returns ``(wall, cpu)`` per call for each phase.
    """
    per_round = max(1, -(-iters // rounds))
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in phases}
    for r in range(rounds):
        for name, (call, setup) in phases.items():
            setup()
            out[name] += time_calls(call, dev, warmup if r == 0 else 1, per_round)
    return out


def phase_rates(calls: list[tuple[float, float]], images: int) -> dict:
    """Images/s at the median and the best call, and CPU seconds per image (median), of one phase."""
    walls, cpus = [w for w, _ in calls], [c for _, c in calls]
    return {"images_per_s": images / statistics.median(walls), "images_per_s_best": images / min(walls),
            "median_batch_s": statistics.median(walls), "min_batch_s": min(walls),
            "cpu_s_per_image": statistics.median(cpus) / images, "calls": len(calls)}


def _naive_runner(model: FeatureModel, module_name: str, x: torch.Tensor, t: torch.Tensor
                  ) -> Callable[[], torch.Tensor]:
    """The model's own full forward (with the family's conditioning) and a forward hook on the block's module:
    no early exit."""
    module = dict(model.denoiser.named_modules())[module_name]
    captured: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        handle = module.register_forward_hook(
            lambda _m, _a, out: captured.append(out if torch.is_tensor(out) else out[0]))
        try:
            with torch.inference_mode():
                model.full_forward(x, t)
        finally:
            handle.remove()
        return captured.pop()

    return run


def _micro_runner(call, x: torch.Tensor, t: torch.Tensor, micro: int, autocast) -> Callable[[], dict]:
    """The truncated forward over ``x`` in micro-batches, as the extract loop runs it."""

    def run() -> dict:
        with torch.inference_mode(), autocast:
            for lo in range(0, x.shape[0], micro):
                out = call(x[lo:lo + micro], t[lo:lo + micro])
        return out

    return run


def write_images(root: Path, n: int, size: tuple[int, int], classes: int = 4) -> Path:
    """``n`` JPEG photographs-alike (smooth colour fields plus grain) in ``root/train/<class>/``; returns root.

    Random pixels would decode slower than photographs and flat colours faster;
    a smooth field with sensor-like noise compresses about like a camera image.
    """
    width, height = size

    def one(i: int) -> None:
        from PIL import Image

        rng = np.random.default_rng(i)
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0.0, 8.0, field.shape), 0, 255).astype(np.uint8)
        path = root / "train" / f"class_{i % classes}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))
    return root


def _cosines(fwd, x: torch.Tensor, t: torch.Tensor, block: int, micro: int, dtype: str, dev: torch.device) -> dict:
    """Per-sample cosine between the block's activations (raw and 1x1-pooled) at ``dtype`` and in float32."""
    from diffeat.extract.forward import COMPUTE_DTYPES

    low_ctx = torch.autocast(dev.type, dtype=COMPUTE_DTYPES[dtype])
    raw, pooled = [], []
    with torch.inference_mode():
        for lo in range(0, x.shape[0], micro):
            xs, ts = x[lo:lo + micro], t[lo:lo + micro]
            ref = fwd(xs, ts)[block].float()
            with low_ctx:
                low = fwd(xs, ts)[block].float()
            raw.append(F.cosine_similarity(low.flatten(1), ref.flatten(1), dim=1))
            pooled.append(F.cosine_similarity(low.mean((2, 3)), ref.mean((2, 3)), dim=1))
    raw_t, pooled_t = torch.cat(raw), torch.cat(pooled)
    return {"min": raw_t.min().item(), "median": raw_t.median().item(), "min_pooled": pooled_t.min().item(),
            "samples": int(raw_t.numel()), "passed": bool(raw_t.min().item() >= 0.999)}


def bench(
    *,
    arch: str = "adm256",
    model: str | None = None,
    block: int | None = None,
    t: int = 90,
    batch_size: int | str = "auto",
    resolution: int | None = None,
    dtype: str | None = None,
    device: str = "auto",
    images: int | None = None,
    image_size: tuple[int, int] | None = None,
    warmup: int = 3,
    iters: int = 10,
    compile: bool | None = None,
    num_workers: int | None = None,
    ablation: bool = False,
    peak: float | None = None,
    workdir: str | None = None,
) -> dict:
    """Benchmark extraction of ``block`` of a model (``model`` path, else ``random:<arch>``); see the module doc.

    Defaults: block 24 (the paper's; the middle block on models with fewer
    blocks), bfloat16 on CUDA and float32 on CPU, compiled on CUDA only, ``images``
    = 8 batches (at least 64), source images twice the model resolution wide
    (ImageNet-like 4:3). The loop runs first; the forward and the naive baseline
    are then timed with the batch size, micro-batch and CPU thread count the loop
    used, so the ratios compare like with like. Returns a JSON-friendly dict.
    """
    from diffeat.extract.config import COMPUTE_DTYPE_NAMES, check_batch_size
    from diffeat.extract.forward import observe_loop
    from diffeat.extract.run import extract
    from diffeat.models.families import random_architectures
    from diffeat.models.families.base import block_info, check_table_blocks, default_block
    from diffeat.models.loading import load_model

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dtype = dtype or ("bfloat16" if cuda else "float32")
    check_choice(dtype, COMPUTE_DTYPE_NAMES, "--dtype")
    batch_size = check_batch_size(batch_size)
    for name, value, low in (("--warmup", warmup, 0), ("--iters", iters, 1)):
        if value < low:
            raise DiffeatError(f"{name} {value} is invalid: it must be >= {low}")
    if images is not None and images < 1:
        raise DiffeatError(f"--images {images} is invalid: it must be >= 1")
    compile = cuda if compile is None else compile
    spec = model or f"random:{arch}"

    # Options are checked first, on the architecture alone (a random 550M-parameter model takes
    # ten seconds to build; on the meta device, none): a bad --block fails at once. extract()
    # then loads its own copy.
    if model is None:
        check_choice(arch, sorted(random_architectures()), "--arch", error=ModelError)
    shape_only = load_model(spec, device="meta").model
    noised = shape_only.schedule is not None  # vision backbones take no t: their loop runs without --t
    if noised:
        shape_only.schedule.check_timestep(t)
    res = resolution or shape_only.native_resolution
    table = shape_only.block_table(res)
    if block is None:
        block = default_block(shape_only, table)
    check_table_blocks([block], table)
    info = block_info(table, block)
    del shape_only

    # 1. the whole loop: the real extract() over JPEG files into a zarr store
    if images is None:
        images = max(64, 8 * batch_size) if batch_size != "auto" else (2048 if cuda else 256)
    size = image_size or (2 * res, 3 * res // 2)
    with tempfile.TemporaryDirectory(prefix="diffeat-bench-", dir=workdir) as tmp:
        root = write_images(Path(tmp) / "images", images, size)

        def loop_round(r: int) -> dict:
            wall, cpu = time.perf_counter(), _cpu_seconds()
            with observe_loop() as runs:
                report = extract(dataset="imagefolder", root=str(root), splits=["train"], model=spec,
                                 blocks=[block], ts=[t] if noised else [], pools=[1],
                                 store=str(Path(tmp) / f"feats{r}.zarr"),
                                 batch_size=batch_size, device=str(dev), dtype=dtype, num_workers=num_workers,
                                 resolution=res, compile=compile, progress=False)
            rates = _loop_rates(runs, report, time.perf_counter() - wall)
            rates["cpu_s_per_image"] = (_cpu_seconds() - cpu) / max(1, report.images)
            if cuda:
                torch.cuda.empty_cache()
            return rates

        # 1. the whole loop: the real extract() over JPEG files into a zarr store; run again after
        # 2. (the forward and the naive baseline, alternated), so the loop too is measured on both
        # sides of the others on a machine whose load changes.
        loops = [loop_round(0)]
        threads = torch.get_num_threads()
        torch.set_num_threads(loops[0]["threads"])  # as the loop ran: same batch, micro-batch, threads
        try:
            timed = _time_forwards(spec, block, info.module, t, res, dtype, dev, loops[0]["batch_size"],
                                   loops[0]["micro_batch"], compile, warmup, iters, ablation)
        finally:
            torch.set_num_threads(threads)
        loops.append(loop_round(1))
    loop = {**loops[0], "images_per_s": statistics.median(r["images_per_s"] for r in loops),
            "images_per_s_best": max(r["images_per_s"] for r in loops),
            "cpu_s_per_image": statistics.median(r["cpu_s_per_image"] for r in loops), "rounds": len(loops)}
    forward, naive = timed["forward"], timed["naive"]
    flops, flops_full, flops_vae = timed["flops"], timed["flops_full"], timed["flops_vae"]

    achieved = flops * forward["images_per_s"] / 1e12
    card_peak = peak if peak is not None else peak_tflops(dev)
    return {
        "model": spec, "block": block, "module": info.module,
        "block_shape": [info.channels, info.height, info.width], "t": t if noised else None, "resolution": res,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "threads": loop["threads"], "dtype": dtype, "compiled": loop["compiled"],
        "batch_size": loop["batch_size"], "micro_batch": loop["micro_batch"], "images": images,
        "image_size": list(size), "gflop_per_image": flops / 1e9, "gflop_per_image_full": flops_full / 1e9,
        "gflop_per_image_vae": flops_vae / 1e9, "family": timed["family"],
        "forward": forward, "loop": loop, "naive": naive,
        "achieved_tflops": achieved, "loop_tflops": flops * loop["images_per_s"] / 1e12,
        "naive_tflops": flops_full * naive["images_per_s"] / 1e12,
        "peak_tflops": card_peak, "fraction_of_peak": achieved / card_peak if card_peak else None,
        "ratios": {
            "loop_over_forward": loop["images_per_s"] / forward["images_per_s"],
            "forward_over_naive": forward["images_per_s"] / naive["images_per_s"],
            "loop_over_naive": loop["images_per_s"] / naive["images_per_s"],
            # CPU seconds per image: what each costs whatever else the machine ran meanwhile
            "loop_over_forward_cpu": forward["cpu_s_per_image"] / loop["cpu_s_per_image"],
            "forward_over_naive_cpu": naive["cpu_s_per_image"] / forward["cpu_s_per_image"],
        },
        "cosine": timed["cosine"], "ablation": timed["ablation"],
    }


def _time_forwards(spec: str, block: int, module_name: str, t: int, res: int, dtype: str, dev: torch.device,
                   batch_size: int, micro: int, compile: bool, warmup: int, iters: int, ablation: bool) -> dict:
    """Forward-only and naive images/s (and FLOPs, the dtype-vs-fp32 cosine, the optional ablation)."""
    from diffeat.extract.forward import COMPUTE_DTYPES, prepare_forward
    from diffeat.models.flops import count_model_flops, count_vae_flops
    from diffeat.models.loading import load_model

    cuda = dev.type == "cuda"
    # Random weights are built on the device itself: SD-1.5's 860M parameters take ~10 s on a CPU.
    model = load_model(spec, device=str(dev) if spec.startswith("random:") else "cpu").model
    unet = model.denoiser
    flops, flops_full = count_model_flops(model, res, block), count_model_flops(model, res, None)
    flops_vae = count_vae_flops(model, res)
    prepared = prepare_forward(model, [block], dev, dtype, compile)
    rows = -(-batch_size // micro) * micro  # whole micro-batches, as the loop runs them (it pads the last)
    autocast = torch.autocast(dev.type, dtype=COMPUTE_DTYPES[dtype], enabled=dtype != "float32")
    x = torch.randn(rows, *model.input_shape(res), generator=torch.Generator().manual_seed(0)).to(dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    tt = torch.full((rows,), t, device=dev, dtype=torch.long)

    def peak_mib() -> float | None:
        return torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None

    logger.info("bench: block %d (%s) at %d px, %s on %s, batch %d (micro %d), compiled %s, %d threads",
                block, module_name, res, dtype, dev, batch_size, micro, prepared.compiled, torch.get_num_threads())
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    _micro_runner(prepared.call, x[:micro], tt[:micro], micro, autocast)()  # compiles, when compiled
    first_call = time.perf_counter() - start
    cosine = _cosines(prepared.fwd, x, tt, block, micro, dtype, dev) if dtype != "float32" else None

    def as_forward() -> None:
        unet.to(memory_format=torch.channels_last if cuda else torch.contiguous_format)

    def as_naive() -> None:
        unet.to(memory_format=torch.contiguous_format)

    # The naive baseline: full fp32 forward, a hook, no early exit, no autocast, default memory format.
    # The full fp32 forward keeps every skip: it may not fit the forward's batch. Its batch is probed in
    # the naive layout (the forward left the U-Net channels_last on CUDA).
    as_naive()
    naive_batch = _naive_batch(model, module_name, x, tt, batch_size, dev)
    xn = x[:naive_batch].contiguous()

    phases = {"forward": (_micro_runner(prepared.call, x, tt, micro, autocast), as_forward),
              "naive": (_naive_runner(model, module_name, xn, tt[:naive_batch]), as_naive)}
    peaks = {}
    for name, (call, setup) in phases.items():  # each phase's own peak memory, before the timed rounds
        setup()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        call()
        peaks[name] = peak_mib()
    calls = interleaved(phases, dev, warmup, iters)
    forward = {**phase_rates(calls["forward"], rows), "first_call_s": first_call, "peak_memory_mib": peaks["forward"]}
    naive = {**phase_rates(calls["naive"], naive_batch), "batch_size": naive_batch,
             "peak_memory_mib": peaks["naive"]}
    as_forward()
    del xn
    steps = None
    if ablation:
        steps = _ablation(model, block, x, tt, micro, dtype, dev, warmup, iters, naive, forward, prepared.compiled)
    return {"forward": forward, "naive": naive, "cosine": cosine, "ablation": steps, "flops": flops,
            "flops_full": flops_full, "flops_vae": flops_vae, "family": model.family}


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (loader workers)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _naive_batch(model: FeatureModel, module_name: str, x: torch.Tensor, tt: torch.Tensor, batch_size: int,
                 dev: torch.device) -> int:
    """The largest batch (halving from ``batch_size``) the naive full fp32 forward runs at on ``dev``."""
    if dev.type != "cuda":
        return batch_size
    batch = batch_size
    while True:
        torch.cuda.empty_cache()
        try:
            _naive_runner(model, module_name, x[:batch].contiguous(), tt[:batch])()
            return batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2


def _loop_rates(runs: list, report, wall: float) -> dict:
    """Steady-state images/s over every ``run_forward`` call of one extract, after the first batch."""
    marks = [m for r in runs for m in r.marks]
    if not runs or not marks:
        raise DiffeatError("the extract loop wrote nothing: was the store already complete?")
    first_images, first_time = runs[0].marks[0]
    total = sum(r.images for r in runs)
    end = runs[-1].finished
    if total > first_images:
        steady = (total - first_images) / max(end - first_time, 1e-9)
    else:  # a single batch: nothing after warm-up to time
        steady = total / max(end - runs[0].started, 1e-9)
    first = runs[0]
    return {"images_per_s": steady, "images_per_s_end_to_end": report.images / wall if wall else 0.0,
            "seconds_end_to_end": wall, "forward_calls": len(runs), "batches": len(marks),
            "truncated": all(r.truncated for r in runs), "batch_size": first.batch_size,
            "micro_batch": first.micro_batch, "threads": first.threads, "num_workers": first.num_workers,
            "compiled": first.compiled}


def _ablation(model: FeatureModel, block, x, tt, micro, dtype, dev, warmup, iters, naive, forward, compiled
              ) -> list[dict]:
    """Forward-only images/s as each optimisation is added (the last row is the measured forward)."""
    from diffeat.extract.forward import COMPUTE_DTYPES

    cuda = dev.type == "cuda"
    unet = model.denoiser
    rows = [{"step": "naive: full forward, fp32, hook", **_row(naive)}]
    fwd = model.feature_forward([block]).to(dev)
    off = torch.autocast(dev.type, enabled=False)
    on = torch.autocast(dev.type, dtype=COMPUTE_DTYPES[dtype], enabled=dtype != "float32")
    xc = x.contiguous()
    configs = [("+ early exit, skips dropped (fp32)", False, off), ("+ channels_last", True, off)]
    if dtype != "float32":
        configs.append((f"+ {dtype} autocast", True, on))
    for label, channels_last, ctx in configs:
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if channels_last else xc
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        times = time_it(_micro_runner(fwd, xi, tt, micro, ctx), dev, warmup, iters)
        rows.append({"step": label, "images_per_s": x.shape[0] / statistics.median(times),
                     "peak_memory_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None})
    unet.to(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    rows.append({"step": "+ torch.compile" if compiled else "as measured (not compiled)", **_row(forward)})
    return rows


def _row(measured: dict) -> dict:
    return {"images_per_s": measured["images_per_s"], "peak_memory_mib": measured.get("peak_memory_mib")}
