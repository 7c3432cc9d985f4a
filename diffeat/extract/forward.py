"""The forward loop of the extract stage: batches of noised images -> pooled block features -> writers.

``run_forward`` is what one process (or one dask worker) runs over the rows it
is responsible for; ``diffeat.extract.run`` decides which rows and settings those are.

What keeps the loop fast (docs/performance.md has the measurements):

* the forward is the model family's truncated forward (``TruncatedUNet`` for U-Nets,
  ``TruncatedTransformer`` for diffusion transformers): built once per (model, blocks,
  device, dtype), it stops after the deepest block (U-Nets: and never keeps a skip
  activation no executed layer uses); on CUDA it is ``torch.compile``-d;
* latent models: the VAE encodes each batch once on the device (float32, padded
  micro-batches like the forward), and every t and noise draw reuses the latents;
* bf16/fp16 autocast when asked, channels_last on CUDA;
* decoding, preprocessing and noising in DataLoader workers, pinned host memory,
  non-blocking host-to-device copies;
* device-to-host copies of the pooled features are non-blocking into pinned
  memory and collected one batch later, so the CPU queues batch i+1 while the GPU
  still works on batch i; a background thread writes to zarr;
* ``batch_size="auto"``: the largest power of two whose measured peak memory
  fits the free GPU memory with headroom (a fixed size on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from diffeat.errors import DiffeatError
from diffeat.extract.config import COMPUTE_DTYPE_NAMES
from diffeat.extract.loader import ImagesAndNoise, NoisedImages, PreprocessedImages, bad_images, make_loader
from diffeat.runtime.progress import Progress
from diffeat.runtime.threads import usable_cpus
from diffeat.store.writer import BackgroundWriter

if TYPE_CHECKING:
    from diffeat.extract.results import ExtractReport
    from diffeat.extract.work import SplitWork
    from diffeat.models.families.base import FeatureModel
    from diffeat.store.writer import SettingWriter

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPE_NAMES}
CPU_MICRO_BATCH = 8
#: ``batch_size="auto"`` on a CPU: a few micro-batches per loader batch (memory is not the limit there).
CPU_AUTO_BATCH = 32
#: ``batch_size="auto"`` on CUDA: at most this many images (throughput saturates well before).
AUTO_MAX_BATCH = 256
#: ``batch_size="auto"`` on CUDA: use at most this share of the memory free after loading the model.
AUTO_MEMORY_SHARE = 0.8


@dataclass
class LoopStats:
    """Timing of one ``run_forward`` call, collected inside ``observe_loop``."""

    batch_size: int = 0
    micro_batch: int = 0
    num_workers: int = 0
    threads: int = 0  # intra-op CPU threads the forward ran with
    compiled: bool = False
    truncated: bool = True  # False when the model needed the hook-based fallback (not compilable)
    started: float = 0.0
    finished: float = 0.0
    #: (images written so far, time.perf_counter()) after each batch was handed to the writer
    marks: list[tuple[int, float]] = field(default_factory=list)

    @property
    def images(self) -> int:
        """Images through the loop."""
        return self.marks[-1][0] if self.marks else 0

    def steady_rate(self, skip: int = 1) -> float:
        """Images/s after the first ``skip`` batches (worker start-up, compilation), up to the last write."""
        if len(self.marks) <= skip:
            skip = 0
        n0, t0 = self.marks[skip - 1] if skip else (0, self.started)
        return (self.images - n0) / max(self.finished - t0, 1e-9)


_OBSERVER: ContextVar[list[LoopStats] | None] = ContextVar("diffeat_forward_observer", default=None)


@contextmanager
def observe_loop() -> Iterator[list[LoopStats]]:
    """Collect a ``LoopStats`` for every ``run_forward`` call made inside (``diffeat bench`` uses it)."""
    token = _OBSERVER.set([])
    try:
        yield _OBSERVER.get()  # type: ignore[misc]
    finally:
        _OBSERVER.reset(token)


def default_workers(dev: torch.device) -> int:
    """Loader processes: on a GPU, enough to decode JPEGs as fast as the forward; on a CPU they share cores.

    One worker decodes, preprocesses and noises an ImageNet-sized JPEG (500x375) in
    about 4.5 ms (measured, docs/performance.md): 8 workers feed ~1,700 images/s,
    well above what one H100 computes for ADM-256 block 24 (~600/s at 40% of peak),
    while each worker's prefetched batches cost shared memory.
    """
    return max(1, min(8, usable_cpus() - 1)) if dev.type == "cuda" else 1


@dataclass
class PreparedForward:
    """A truncated forward made ready for one device and dtype (``call`` is it, or its compiled version)."""

    fwd: torch.nn.Module  # the family's truncated forward (or a U-Net's hook fallback)
    call: Callable[..., dict[int, torch.Tensor]]  # fwd, or torch.compile(fwd)
    compiled: bool
    auto_batch: dict[tuple, int] = field(default_factory=dict)


def prepare_forward(model: FeatureModel, blocks, dev: torch.device, dtype: str,
                    compile: bool | None = None) -> PreparedForward:
    """The (possibly compiled) truncated forward of ``model`` for ``blocks`` on ``dev`` (compiled on CUDA by default).

    Moves the model (denoiser, VAE, conditioning) to ``dev``; the denoiser is channels_last on CUDA.
    """
    if compile is None:
        compile = dev.type == "cuda"
    model.to(dev)
    if dev.type == "cuda":
        model.denoiser.to(memory_format=torch.channels_last)
    fwd = model.feature_forward(blocks).to(dev)
    call, compiled = fwd, False
    if compile and fwd.compilable:
        # Fixed shapes (batches are padded): one graph, no recompilation per batch size.
        call, compiled = torch.compile(fwd, dynamic=False), True
        # diffusers' Upsample2D asks an lru_cache'd version check, which dynamo traces through
        # (correctly: the answer is a constant) with a warning per process; it is noise here.
        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`-wrapped "
                                r"function at 'upsampling\.py", category=UserWarning)
    elif compile:
        logger.warning("not compiling: this model runs through the hook-based fallback")
    return PreparedForward(fwd, call, compiled)


class ForwardCache:
    """The prepared forward of the model in use, kept across the tasks of a run.

    ``run_forward`` is called once per task (a range of rows); compiling or probing GPU
    memory again for each would cost minutes, so the extract run (or a dask worker's job)
    owns one cache and every task asks it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._prepared: PreparedForward | None = None

    def get(self, model: FeatureModel, blocks, dev: torch.device, dtype: str,
            compile: bool | None = None) -> PreparedForward:
        """The prepared forward for these arguments: the cached one, or a new one replacing it."""
        key = (id(model.denoiser), tuple(sorted(set(blocks))), str(dev), dtype, compile)
        if self._prepared is None or self._key != key or self._prepared.fwd.unet is not model.denoiser:
            self._prepared = None  # free the previous model's forward first
            self._prepared, self._key = prepare_forward(model, blocks, dev, dtype, compile), key
        return self._prepared

    def clear(self) -> None:
        """Forget the prepared forward (and with it the model it holds)."""
        self._key = self._prepared = None


def auto_batch_size(prepared: PreparedForward, model: FeatureModel, dev: torch.device, res: int, dtype: str,
                    inputs_per_image: int = 1) -> int:
    """The batch size ``"auto"`` means: fixed on CPU; on CUDA the largest power of two that fits.

    On CUDA the peak memory of the (eager) truncated forward (latent models: or of the
    VAE encoding, whichever is larger) is measured at two batch sizes, a line through
    them predicts the largest batch that fits in ``AUTO_MEMORY_SHARE`` of the memory free
    after loading the model (the loader's input batch of ``inputs_per_image`` noised
    inputs per row counted too), and the pick is verified by running it, halving on
    out-of-memory.
    """
    if dev.type != "cuda":
        return CPU_AUTO_BATCH
    key = (res, dtype, inputs_per_image)
    if key in prepared.auto_batch:
        return prepared.auto_batch[key]
    shape = model.input_shape(res)
    autocast = torch.autocast("cuda", dtype=COMPUTE_DTYPES[dtype], enabled=dtype != "float32")
    input_bytes = (inputs_per_image * int(np.prod(shape)) + (3 * res * res if model.latent else 0)) * 4

    def peak(b: int) -> int:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            if model.latent:
                model.encode(torch.zeros(b, 3, res, res, device=dev))
            x = torch.zeros(b, *shape, device=dev).contiguous(memory_format=torch.channels_last)
            t = torch.full((b,), 500, device=dev, dtype=torch.long)
            with autocast:
                out = prepared.fwd(x, t)
        del out, x
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base + b * input_bytes

    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(dev)
    budget = free * AUTO_MEMORY_SHARE
    p2, p4 = peak(2), peak(4)
    per_image = max((p4 - p2) / 2, 1.0)
    fixed = max(p2 - 2 * per_image, 0.0)
    fit = int((budget - fixed) // per_image)
    if fit < 1:
        raise DiffeatError(f"--batch-size auto: not even one image fits in the {free / 2**30:.1f} GiB free on "
                           f"{dev}; free GPU memory or use a smaller --resolution")
    batch = 1 << (min(fit, AUTO_MAX_BATCH).bit_length() - 1)  # powers of two divide the store's units
    while batch > 1:
        try:
            if peak(batch) <= budget:
                break
        except torch.OutOfMemoryError:
            pass
        batch //= 2
    torch.cuda.empty_cache()
    logger.info("--batch-size auto: %d on %s (%.0f MiB per image, %.1f GiB free, %.0f%% used at most)",
                batch, dev, per_image / 2**20, free / 2**30, AUTO_MEMORY_SHARE * 100)
    prepared.auto_batch[key] = batch
    return batch


def run_forward(work: SplitWork, rows: np.ndarray, writers: dict[tuple[int, int, int], SettingWriter],
                report: ExtractReport, bar: Progress | None = None) -> None:
    """Compute and write the features of ``rows`` of ``work.tab`` for every writer in ``writers``.

    ``writers`` maps (block, t, pool) to a ``SettingWriter``; rows of units a writer
    does not have pending are computed (they share a batch) but not written. ``bar``: a
    progress bar shared by several calls (one per task); without it, this call makes its own.
    """
    c, model, tab, res, dev = work.config, work.model, work.tab, work.res, work.dev
    blocks, ts, pools, dtype, draws = c.blocks, c.setting_ts(), c.pools, c.dtype, c.noise_draws
    num_workers = work.num_workers
    prepared = work.forwards.get(model, blocks, dev, dtype, c.compile)
    batch_size = c.batch_size
    if batch_size == "auto":
        batch_size = auto_batch_size(prepared, model, dev, res, dtype, len(ts) * draws)
    cuda = dev.type == "cuda"
    if model.schedule is None:  # a vision backbone: its own preprocessing, no noise, no t
        dataset = PreprocessedImages(tab, rows, model.preprocessing.at(res))
    elif model.latent:
        dataset = ImagesAndNoise(tab, rows, res, model.input_shape(res), ts, c.seed, draws)
    else:
        dataset = NoisedImages(tab, rows, res, ts, c.seed, draws, schedule=model.schedule)
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=cuda)
    autocast = torch.autocast(dev.type, dtype=COMPUTE_DTYPES[dtype], enabled=dtype != "float32")
    own_bar = bar is None
    if own_bar:
        bar = Progress(len(rows), f"extract {tab.dataset}/{tab.split}", enabled=work.progress)
    # CPU kernels give results that depend (at 1e-6) on the batch size, but not on a row's
    # position in a batch of fixed size: a fixed, padded micro-batch makes features bitwise
    # independent of --batch-size. GPUs make no such promise, so they use the batch as is,
    # padded only when compiled, to few fixed shapes (a recompilation of a big U-Net costs a
    # minute; padding the last batch of a call, a fraction of a second): the batch size, or
    # for a call with fewer rows (a task of small units) the power of two covering them.
    if cuda:
        micro, pad = min(batch_size, 1 << max(0, (len(rows) - 1).bit_length())), prepared.compiled
    else:
        micro, pad = CPU_MICRO_BATCH, True
    observed = _OBSERVER.get()
    stats = LoopStats(batch_size, micro, num_workers, torch.get_num_threads(), prepared.compiled,
                      prepared.fwd.compilable, started=time.perf_counter())
    if observed is not None:
        observed.append(stats)
    writer = BackgroundWriter()
    pending: tuple | None = None  # the previous batch, its features still on their way to host memory

    def flush(item: tuple) -> None:
        batch_rows, skipped, host, event = item
        if event is not None:
            event.synchronize()
        for key, values in host.items():
            writer.put(writers[key], batch_rows, values.numpy(), skipped)
        report.images += len(batch_rows)
        bar.update(len(batch_rows))
        stats.marks.append((stats.images + len(batch_rows), time.perf_counter()))

    try:
        with torch.inference_mode():
            for batch_rows, *tensors in loader:
                batch_rows = batch_rows.numpy()
                skipped = None
                if (batch_rows < 0).any():  # images that could not be decoded (the loader's marker)
                    bad = batch_rows < 0
                    batch_rows = np.where(bad, -1 - batch_rows, batch_rows)
                    skipped = bad_images(tab, batch_rows[bad], c.on_bad_image)
                    for row, record in skipped.items():
                        logger.warning("skipped %s (row %d): %s", record["id"], row, record["reason"])
                        report.skipped.append({"split": tab.split, "row": row, **record})
                noised = _noised_inputs(model, [x.to(dev, non_blocking=True) for x in tensors], ts, draws, micro, pad)
                results: dict[tuple[int, int, int], torch.Tensor] = {}
                for ti, t in enumerate(ts):
                    sums: dict[tuple[int, int], torch.Tensor] = {}
                    for d in range(draws):
                        pooled = forward_pooled(prepared.call, noised(ti * draws + d), t, blocks, pools, micro,
                                                autocast, pad=pad)
                        report.forwards += 1
                        for key, p in pooled.items():
                            sums[key] = p if d == 0 else sums[key] + p
                    for (b, k), v in sums.items():
                        if (b, t, k) in writers:
                            results[(b, t, k)] = v / draws
                item = (batch_rows, skipped, *_to_host(results, cuda))
                if pending is not None:
                    flush(pending)
                pending = item
                if not cuda:
                    flush(pending)
                    pending = None
            if pending is not None:
                flush(pending)
                pending = None
    except BaseException:
        if pending is not None:  # computed before the failure: keep it (its unit may complete)
            with contextlib.suppress(Exception):
                flush(pending)
        raise
    finally:
        try:
            writer.close()
        finally:
            stats.finished = time.perf_counter()
            if own_bar:
                bar.close()


def _noised_inputs(model: FeatureModel, tensors: list[torch.Tensor], ts, draws: int, micro: int, pad: bool
                   ) -> Callable[[int], torch.Tensor]:
    """The model inputs x_t of one loader batch, by index t-major over (t, draw).

    Pixel models: the loader noised them already. Latent models: the batch's images are
    encoded once here, in micro-batches as the forward runs them (padded on CPU, so the
    latents do not depend on --batch-size), and noised per (t, draw) on the device.
    """
    if not model.latent:
        (xs,) = tensors
        return lambda i: xs[:, i]
    x0, eps = tensors
    # Contiguous, whatever layout the VAE's convolutions chose: CPU GroupNorm takes another kernel on
    # channels_last input (measured 5e-7 apart), and a padded micro-batch (torch.cat) is contiguous.
    latents = torch.cat([model.encode(chunk)[:real] for chunk, real in _micro_batches(x0, micro, pad)]).contiguous()
    flat_ts = [t for t in ts for _ in range(draws)]
    return lambda i: model.schedule.add_noise(latents, eps[:, i], flat_ts[i]).contiguous()


def _micro_batches(x: torch.Tensor, micro: int, pad: bool):
    """(chunk, real rows) of ``x`` in ``micro``-row pieces, the last one zero-padded to ``micro`` when ``pad``."""
    for lo in range(0, x.shape[0], micro):
        chunk = x[lo:lo + micro]
        real = chunk.shape[0]
        if real < micro and pad:
            chunk = torch.cat([chunk, chunk.new_zeros((micro - real,) + tuple(chunk.shape[1:]))])
        yield chunk, real


def _to_host(results: dict, cuda: bool) -> tuple[dict, object]:
    """Start copying ``results`` to host memory; return the host tensors and an event to wait on (CUDA)."""
    if not cuda:
        return {k: v.cpu() for k, v in results.items()}, None
    host = {}
    for k, v in results.items():
        host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        host[k].copy_(v.contiguous(), non_blocking=True)  # pooled maps of a channels_last batch are strided
    event = torch.cuda.Event()
    event.record()
    return host, event


def forward_pooled(fwd, x: torch.Tensor, t: int | None, blocks, pools, micro: int, autocast, *,
                   pad: bool | None = None) -> dict[tuple[int, int], torch.Tensor]:
    """Pooled features {(block, k): (B, C, k, k) float32} of a batch, in micro-batches of ``micro`` rows.

    ``fwd(x, t)`` returns ``{block: activation}`` (``TruncatedUNet``, compiled or not); ``t`` is None
    for a model without a timestep (a vision backbone).
    ``pad`` (default: off CUDA) pads the last micro-batch to ``micro`` rows with zeros.
    """
    cuda = x.device.type == "cuda"
    if pad is None:
        pad = not cuda
    parts: dict[tuple[int, int], list[torch.Tensor]] = {(b, k): [] for b in blocks for k in pools}
    for chunk, real in _micro_batches(x, micro, pad):
        if cuda:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        tt = None if t is None else torch.full((chunk.shape[0],), t, device=x.device, dtype=torch.long)
        with autocast:
            acts = fwd(chunk, tt)
        for b in blocks:
            a = acts[b][:real].float()  # pool in float32 whatever the compute dtype
            for k in pools:
                parts[(b, k)].append(F.adaptive_avg_pool2d(a, k))
        del acts
    return {key: torch.cat(v) for key, v in parts.items()}
