"""The forward loop of the extract stage: batches of noised images -> pooled block features -> writers.

``run_forward`` is what one process (or one dask worker) runs over the rows it
is responsible for; ``diffeat.extract.run`` decides which rows and settings those are.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from diffeat.extract.loader import NoisedImages, make_loader
from diffeat.models.blocks import capture_blocks
from diffeat.progress import Progress
from diffeat.store.writer import BackgroundWriter

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_MICRO_BATCH = 8


def run_forward(unet, tab, rows, writers, blocks, ts, pools, res, dev, dtype, batch_size, num_workers, seed,
                draws, progress, report) -> None:
    """Compute and write the features of ``rows`` of ``tab`` for every writer in ``writers``.

    ``writers`` maps (block, t, pool) to a ``SettingWriter``; rows of units a writer
    does not have pending are computed (they share a batch) but not written.
    """
    if num_workers is None:
        # On a GPU, decoding must keep up with the forward; on a CPU they share cores.
        num_workers = min(8, (os.cpu_count() or 2) - 1) if dev.type == "cuda" else 1
    unet.to(dev)
    if dev.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    dataset = NoisedImages(tab, rows, res, ts, seed, draws)
    loader = make_loader(dataset, batch_size, num_workers, pin_memory=dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=COMPUTE_DTYPES[dtype], enabled=dtype != "float32")
    bar = Progress(len(rows), f"extract {tab.dataset}/{tab.split}", enabled=progress)
    # CPU kernels give results that depend (at 1e-6) on the batch size, but not on a row's
    # position in a batch of fixed size: a fixed, padded micro-batch makes features bitwise
    # independent of --batch-size. GPUs make no such promise, so they use the batch as is.
    micro = batch_size if dev.type == "cuda" else CPU_MICRO_BATCH
    writer = BackgroundWriter()
    try:
        with torch.inference_mode():
            for batch_rows, xs in loader:
                batch_rows = batch_rows.numpy()
                xs = xs.to(dev, non_blocking=True)
                for ti, t in enumerate(ts):
                    sums: dict[tuple[int, int], torch.Tensor] = {}
                    for d in range(draws):
                        pooled = forward_pooled(unet, xs[:, ti * draws + d], t, blocks, pools, micro, autocast)
                        report.forwards += 1
                        for key, p in pooled.items():
                            sums[key] = p if d == 0 else sums[key] + p
                    for (b, k), v in sums.items():
                        w = writers.get((b, t, k))
                        if w is not None:
                            writer.put(w, batch_rows, (v / draws).cpu().numpy())
                report.images += len(batch_rows)
                bar.update(len(batch_rows))
    finally:
        try:
            writer.close()
        finally:
            bar.close()


def forward_pooled(unet, x: torch.Tensor, t: int, blocks, pools, micro: int, autocast
                    ) -> dict[tuple[int, int], torch.Tensor]:
    """Pooled features {(block, k): (B, C, k, k) float32} of a batch, in micro-batches of ``micro`` rows."""
    n = x.shape[0]
    parts: dict[tuple[int, int], list[torch.Tensor]] = {(b, k): [] for b in blocks for k in pools}
    for lo in range(0, n, micro):
        chunk = x[lo:lo + micro]
        real = chunk.shape[0]
        if real < micro and x.device.type != "cuda":
            chunk = torch.cat([chunk, chunk.new_zeros((micro - real,) + tuple(chunk.shape[1:]))])
        if x.device.type == "cuda":
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        tt = torch.full((chunk.shape[0],), t, device=x.device, dtype=torch.long)
        with autocast:
            acts = capture_blocks(unet, chunk, tt, blocks)
        for b in blocks:
            a = acts[b][:real].float()  # pool in float32 whatever the compute dtype
            for k in pools:
                parts[(b, k)].append(F.adaptive_avg_pool2d(a, k))
    return {key: torch.cat(v) for key, v in parts.items()}
