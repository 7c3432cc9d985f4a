"""Extraction on a dask.distributed cluster: whole units of every setting spread over workers.

The coordinator (the ``diffeat extract`` process) checks every option, loads the model
once to hash its weights, creates the settings' arrays and plans tasks (row ranges of
whole units, ``diffeat.extract.tasks``). Each task goes to the cluster as one dask task
carrying a small picklable :class:`SplitJob`; a worker loads the model and opens the
store once (cached per worker process), claims the task's units like any other writer,
computes and writes them straight to the store, and returns counts. Nothing but counts
travels back, so the coordinator's memory does not grow with the dataset.

GPU tasks carry the resource ``{"GPU": 1}``: workers must be started with
``--resources GPU=1`` (``diffeat extract --workers N`` does that itself when it starts a
local cluster on a GPU machine).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
from dataclasses import dataclass, field

from diffeat.errors import DiffeatError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingJob:
    """One setting to write, as the coordinator created it."""

    key: tuple[int, int, int]  # (block, t, pool)
    path: str
    shape: tuple[int, ...]
    attrs: dict = field(hash=False, compare=False)
    label: str = ""


@dataclass(frozen=True)
class SplitJob:
    """What a worker needs to compute units of one split (small, picklable)."""

    store: str
    storage_options: dict | None
    model: str
    weights_sha256: str
    dataset: str
    root: str | None
    classes: str | None
    split: str
    limit: int | None
    manifest_sha256: str
    settings: tuple[SettingJob, ...]
    blocks: tuple[int, ...]
    ts: tuple[int, ...]
    pools: tuple[int, ...]
    res: int
    device: str
    dtype: str
    store_dtype: str
    batch_size: int | str
    num_workers: int | None
    seed: int
    draws: int
    chunk_rows: int | None
    compile: bool | None = None

    def cache_key(self) -> tuple:
        """What a worker may reuse between tasks of this job."""
        return (self.store, self.model, self.weights_sha256, self.dataset, self.root, self.split, self.limit,
                self.manifest_sha256, tuple(s.path for s in self.settings), self.device, self.dtype)


_WORKER_CACHE: dict[tuple, object] = {}  # per worker process: the model, store and writers of the last job
MODEL_LOADS = [0]  # models this worker process has loaded (tests check: once per worker and job)


def _work_for(job: SplitJob):
    """The worker's ``SplitWork`` for ``job``: model loaded and store opened once per worker."""
    from diffeat.data import open_dataset
    from diffeat.devices import resolve_device
    from diffeat.extract.tasks import SplitWork
    from diffeat.models.loading import load_model
    from diffeat.store import open_store
    from diffeat.store.writer import SettingWriter

    key = job.cache_key()
    work = _WORKER_CACHE.get(key)
    if work is not None:
        for w in work.writers.values():
            w.refresh()
        return work
    _WORKER_CACHE.clear()  # one job at a time: free the previous model
    tab = open_dataset(job.dataset, job.root, classes=job.classes).samples(job.split)
    tab = tab.head(job.limit) if job.limit is not None else tab
    if tab.manifest_sha256() != job.manifest_sha256:
        raise DiffeatError(f"worker {platform.node()}: dataset {job.dataset}/{job.split} at {job.root} differs from "
                           "the coordinator's (manifest hash): workers must see the same files")
    loaded = load_model(job.model)
    MODEL_LOADS[0] += 1
    if loaded.weights_sha256 != job.weights_sha256:
        raise DiffeatError(f"worker {platform.node()}: model {job.model} has other weights than the coordinator's "
                           f"({loaded.weights_sha256[:12]} != {job.weights_sha256[:12]})")
    fs = open_store(job.store, mode="a", storage_options=job.storage_options)
    writers = {s.key: SettingWriter.open(fs, s.path, s.shape, job.store_dtype, s.attrs, s.label,
                                         chunk_rows=job.chunk_rows) for s in job.settings}
    # Dask workers are daemonic processes, which may not start loader processes of their own.
    num_workers = 0 if multiprocessing.current_process().daemon else job.num_workers
    work = SplitWork(loaded.unet, tab, writers, list(job.blocks), list(job.ts), list(job.pools), job.res,
                     resolve_device(job.device), job.dtype, job.batch_size, num_workers, job.seed, job.draws,
                     progress=False, compile=job.compile)
    _WORKER_CACHE[key] = work
    return work


def cluster_task(job: SplitJob, lo: int, hi: int) -> dict:
    """One dask task: claim and compute the units of rows [lo, hi); return counts."""
    from diffeat.extract.run import ExtractReport
    from diffeat.extract.tasks import run_task

    work = _work_for(job)
    report = ExtractReport(model=job.model, dataset=job.dataset, store=job.store)
    before = {s.key: work.writers[s.key].written for s in job.settings}
    units = run_task(work, lo, hi, report)
    return {"units": units, "images": report.images, "forwards": report.forwards,
            "written": {work.writers[k].path: work.writers[k].written - n for k, n in before.items()},
            "worker": f"{platform.node()}:{os.getpid()}"}


def run_on_cluster(client, job: SplitJob, tasks: list[tuple[int, int]], report, *, gpu: bool,
                   progress: bool | None = None) -> dict[str, int]:
    """Run ``tasks`` of ``job`` on the cluster; add images/forwards to ``report``; units written per array path."""
    from distributed import as_completed

    from diffeat.progress import Progress

    resources = {"GPU": 1} if gpu else None
    futures = [client.submit(cluster_task, job, lo, hi, resources=resources, pure=False,
                             key=f"diffeat-extract-{job.split}-{lo}-{os.getpid()}") for lo, hi in tasks]
    written: dict[str, int] = {}
    workers: set[str] = set()
    bar = Progress(len(tasks), f"extract {job.dataset}/{job.split} on the cluster", enabled=progress)
    try:
        for future in as_completed(futures):
            r = future.result()  # re-raises a worker's error here
            report.images += r["images"]
            report.forwards += r["forwards"]
            workers.add(r["worker"])
            for path, n in r["written"].items():
                written[path] = written.get(path, 0) + n
            bar.update(1)
    finally:
        bar.close()
        for f in futures:
            f.cancel()
    logger.info("%s/%s: %d tasks on %d workers", job.dataset, job.split, len(tasks), len(workers))
    report.workers = sorted(workers | set(report.workers))
    return written
