"""``diffeat bench``: how fast extraction runs, measured in one run, against the naive way.

Measured on one device, with the same batch size for all three rates:

* **forward**: the truncated forward alone (``TruncatedUNet`` on a batch already on
  the device, at the chosen dtype, channels_last on CUDA, compiled if asked), in the
  micro-batches the extract loop uses;
* **loop**: the real ``extract()`` over ``images`` JPEG files written to a temporary
  imagefolder (decode, preprocess, noise in loader workers, forward, pool, write to
  a temporary zarr store), at steady state: the first batch (worker start-up,
  compilation) is not counted, everything after it is, up to the last write;
* **naive**: the full forward in float32 with a forward hook on the block's module
  and no early exit, no autocast, no compilation (what the paper's code does).

Plus the counted FLOPs per image of the truncated forward
(``diffeat.models.flops.count_flops``), the achieved TFLOP/s, the ratios, and,
when the dtype is not float32, the per-sample cosine between the block's
features at that dtype and in float32. Timings use warm-up iterations, device
synchronisation around each timed iteration, and medians.

A random-weight model (``random:adm256``) costs exactly what the real checkpoint
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

import numpy as np
import torch
import torch.nn.functional as F

from diffeat.errors import DiffeatError, ModelError
from diffeat.runtime.checks import check_choice
from diffeat.runtime.devices import resolve_device

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
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - start)
    return times


def _naive_runner(unet: torch.nn.Module, module_name: str, x: torch.Tensor, t: torch.Tensor
                  ) -> Callable[[], torch.Tensor]:
    """The full forward with a forward hook on the block's module (no early exit)."""
    from diffeat.models.blocks import model_inputs

    module = dict(unet.named_modules())[module_name]
    inputs = model_inputs(unet, x.shape[0], x.device, x.dtype)
    captured: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        handle = module.register_forward_hook(
            lambda _m, _a, out: captured.append(out if torch.is_tensor(out) else out[0]))
        try:
            with torch.inference_mode():
                unet(x, t, **inputs)
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
    from diffusers import UNet2DModel

    from diffeat.extract.config import COMPUTE_DTYPE_NAMES, check_batch_size
    from diffeat.extract.forward import observe_loop
    from diffeat.extract.run import extract
    from diffeat.models.blocks import block_table, check_blocks
    from diffeat.models.loading import ARCHITECTURES, load_model
    from diffeat.models.noise import check_timestep

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dtype = dtype or ("bfloat16" if cuda else "float32")
    check_choice(dtype, COMPUTE_DTYPE_NAMES, "--dtype")
    check_timestep(t)
    batch_size = check_batch_size(batch_size)
    for name, value, low in (("--warmup", warmup, 0), ("--iters", iters, 1)):
        if value < low:
            raise DiffeatError(f"{name} {value} is invalid: it must be >= {low}")
    if images is not None and images < 1:
        raise DiffeatError(f"--images {images} is invalid: it must be >= 1")
    compile = cuda if compile is None else compile
    spec = model or f"random:{arch}"

    # Options are checked first, on the architecture alone (a random 550M-parameter model takes
    # ten seconds to build): a bad --block fails at once. extract() then loads its own copy.
    if model is None:
        check_choice(arch, sorted(ARCHITECTURES), "--arch", error=ModelError)
        with torch.device("meta"):
            unet = UNet2DModel(**ARCHITECTURES[arch])
    else:
        unet = load_model(model).unet
    size_ = unet.config.sample_size
    res = resolution or int(size_[0] if isinstance(size_, (list, tuple)) else size_)
    table = block_table(unet, res)
    if block is None:
        block = 24 if len(table) >= 24 else next(b.index for b in table if b.module == "mid_block")
    check_blocks([block], len(table))
    info = table[block - 1]
    del unet

    # 1. the whole loop: the real extract() over JPEG files into a zarr store
    if images is None:
        images = max(64, 8 * batch_size) if batch_size != "auto" else (2048 if cuda else 256)
    size = image_size or (2 * res, 3 * res // 2)
    with tempfile.TemporaryDirectory(prefix="diffeat-bench-", dir=workdir) as tmp:
        root = write_images(Path(tmp) / "images", images, size)
        start = time.perf_counter()
        with observe_loop() as runs:
            report = extract(dataset="imagefolder", root=str(root), splits=["train"], model=spec, blocks=[block],
                             ts=[t], pools=[1], store=str(Path(tmp) / "feats.zarr"), batch_size=batch_size,
                             device=str(dev), dtype=dtype, num_workers=num_workers, resolution=res,
                             compile=compile, progress=False)
        wall = time.perf_counter() - start
    loop = _loop_rates(runs, report, wall)
    if cuda:
        torch.cuda.empty_cache()

    # 2. the forward and the naive baseline, as the loop ran: same batch, micro-batch, threads
    threads = torch.get_num_threads()
    torch.set_num_threads(loop["threads"])
    try:
        timed = _time_forwards(spec, block, info.module, t, res, dtype, dev, loop["batch_size"],
                               loop["micro_batch"], compile, warmup, iters, ablation)
    finally:
        torch.set_num_threads(threads)
    forward, naive = timed["forward"], timed["naive"]
    flops, flops_full = timed["flops"], timed["flops_full"]

    achieved = flops * forward["images_per_s"] / 1e12
    card_peak = peak if peak is not None else peak_tflops(dev)
    return {
        "model": spec, "block": block, "module": info.module,
        "block_shape": [info.channels, info.height, info.width], "t": t, "resolution": res,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
        "threads": loop["threads"], "dtype": dtype, "compiled": loop["compiled"],
        "batch_size": loop["batch_size"], "micro_batch": loop["micro_batch"], "images": images,
        "image_size": list(size), "gflop_per_image": flops / 1e9, "gflop_per_image_full": flops_full / 1e9,
        "forward": forward, "loop": loop, "naive": naive,
        "achieved_tflops": achieved, "loop_tflops": flops * loop["images_per_s"] / 1e12,
        "naive_tflops": flops_full * naive["images_per_s"] / 1e12,
        "peak_tflops": card_peak, "fraction_of_peak": achieved / card_peak if card_peak else None,
        "ratios": {
            "loop_over_forward": loop["images_per_s"] / forward["images_per_s"],
            "forward_over_naive": forward["images_per_s"] / naive["images_per_s"],
            "loop_over_naive": loop["images_per_s"] / naive["images_per_s"],
        },
        "cosine": timed["cosine"], "ablation": timed["ablation"],
    }


def _time_forwards(spec: str, block: int, module_name: str, t: int, res: int, dtype: str, dev: torch.device,
                   batch_size: int, micro: int, compile: bool, warmup: int, iters: int, ablation: bool) -> dict:
    """Forward-only and naive images/s (and FLOPs, the dtype-vs-fp32 cosine, the optional ablation)."""
    from diffeat.extract.forward import COMPUTE_DTYPES, prepare_forward
    from diffeat.models.flops import count_flops
    from diffeat.models.loading import load_model
    from diffeat.models.truncated import TruncatedUNet

    cuda = dev.type == "cuda"
    unet = load_model(spec).unet
    flops, flops_full = count_flops(unet, res, block), count_flops(unet, res, None)
    prepared = prepare_forward(unet, [block], dev, dtype, compile)
    rows = -(-batch_size // micro) * micro  # whole micro-batches, as the loop runs them (it pads the last)
    autocast = torch.autocast(dev.type, dtype=COMPUTE_DTYPES[dtype], enabled=dtype != "float32")
    x = torch.randn(rows, unet.config.in_channels, res, res, generator=torch.Generator().manual_seed(0)).to(dev)
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
    times = time_it(_micro_runner(prepared.call, x, tt, micro, autocast), dev, warmup, iters)
    forward = {"images_per_s": rows / statistics.median(times), "median_batch_s": statistics.median(times),
               "first_call_s": first_call, "peak_memory_mib": peak_mib()}
    cosine = _cosines(prepared.fwd, x, tt, block, micro, dtype, dev) if dtype != "float32" else None

    # The naive baseline: full fp32 forward, a hook, no early exit, no autocast, default memory format.
    unet.to(memory_format=torch.contiguous_format)
    naive_batch, naive = batch_size, None
    while naive is None:
        xn = x[:naive_batch].contiguous()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            times = time_it(_naive_runner(unet, module_name, xn, tt[:naive_batch]), dev, warmup, iters)
            naive = {"images_per_s": naive_batch / statistics.median(times),
                     "median_batch_s": statistics.median(times), "batch_size": naive_batch,
                     "peak_memory_mib": peak_mib()}
        except torch.OutOfMemoryError:
            if naive_batch == 1:
                raise
            naive_batch //= 2  # the full fp32 forward keeps every skip: it may not fit the same batch
        finally:
            del xn
    steps = None
    if ablation:
        steps = _ablation(unet, block, x, tt, micro, dtype, dev, warmup, iters, naive, forward,
                          prepared.compiled, TruncatedUNet)
    return {"forward": forward, "naive": naive, "cosine": cosine, "ablation": steps, "flops": flops,
            "flops_full": flops_full}


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


def _ablation(unet, block, x, tt, micro, dtype, dev, warmup, iters, naive, forward, compiled,
              truncated_cls) -> list[dict]:
    """Forward-only images/s as each optimisation is added (the last row is the measured forward)."""
    from diffeat.extract.forward import COMPUTE_DTYPES

    cuda = dev.type == "cuda"
    rows = [{"step": "naive: full forward, fp32, hook", **_row(naive)}]
    fwd = truncated_cls(unet, [block])
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
