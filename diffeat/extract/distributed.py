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
from typing import TYPE_CHECKING

from diffeat.errors import DiffeatError
from diffeat.extract.config import ExtractConfig
from diffeat.extract.forward import default_workers
from diffeat.extract.results import ExtractReport
from diffeat.extract.work import SplitWork
from diffeat.runtime.progress import Progress

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingJob:
    """One setting to write, as the coordinator created it."""

    key: tuple[int, int | None, int]  # (block, t, pool); t None: a model without a timestep
    path: str
    shape: tuple[int, ...]
    attrs: dict = field(hash=False, compare=False)
    label: str = ""


@dataclass(frozen=True)
class SplitJob:
    """What a worker needs to compute units of one split (small, picklable): the options record
    (paths made absolute) plus what the coordinator resolved and workers must agree with."""

    config: ExtractConfig
    split: str
    weights_sha256: str
    manifest_sha256: str
    res: int
    settings: tuple[SettingJob, ...]

    def cache_key(self) -> tuple:
        """What a worker may reuse between tasks of this job: everything of it."""
        return (self.config.key(), self.split, self.weights_sha256, self.manifest_sha256, self.res,
                tuple(s.path for s in self.settings))


# Per worker process: the SplitWork (model, store, writers, prepared forward) of the last job, so
# the model is loaded once per worker and job however many tasks the worker runs.
_WORKER_CACHE: dict[tuple, SplitWork] = {}


def _work_for(job: SplitJob) -> tuple[SplitWork, bool]:
    """The worker's ``SplitWork`` for ``job`` and whether this call loaded the model."""
    from diffeat.data import open_dataset
    from diffeat.extract.forward import ForwardCache
    from diffeat.models.loading import load_model
    from diffeat.runtime.devices import resolve_device
    from diffeat.store import open_store
    from diffeat.store.writer import SettingWriter

    key = job.cache_key()
    work = _WORKER_CACHE.get(key)
    if work is not None:
        for w in work.writers.values():
            w.refresh()
        return work, False
    _WORKER_CACHE.clear()  # one job at a time: free the previous model
    c = job.config
    tab = open_dataset(c.dataset, c.root, classes=c.classes).samples(job.split)
    tab = tab.head(c.limit) if c.limit is not None else tab
    if tab.manifest_sha256() != job.manifest_sha256:
        raise DiffeatError(f"worker {platform.node()}: dataset {c.dataset}/{job.split} at {c.root} differs from "
                           "the coordinator's (manifest hash): workers must see the same files")
    loaded = load_model(c.model)
    if loaded.weights_sha256 != job.weights_sha256:
        raise DiffeatError(f"worker {platform.node()}: model {c.model} has other weights than the coordinator's "
                           f"({loaded.weights_sha256[:12]} != {job.weights_sha256[:12]})")
    # Latent models: the VAE, text encoders and scheduler config the worker read must be the coordinator's too.
    expected = job.settings[0].attrs["settings"].get("family", {}) if job.settings else {}
    if loaded.model.identity(job.res) != expected:
        raise DiffeatError(f"worker {platform.node()}: model {c.model} differs from the coordinator's in its VAE, "
                           "conditioning or schedule (the pipeline folder's other components): workers must see "
                           "the same files")
    fs = open_store(c.store, mode="a", storage_options=c.storage_options)
    writers = {s.key: SettingWriter.open(fs, s.path, s.shape, c.store_dtype, s.attrs, s.label,
                                         chunk_rows=c.chunk_rows) for s in job.settings}
    dev = resolve_device(c.device)
    # Dask workers are daemonic processes, which may not start loader processes of their own.
    num_workers = 0 if multiprocessing.current_process().daemon else (
        c.num_workers if c.num_workers is not None else default_workers(dev))
    work = SplitWork(c, loaded.model, tab, writers, job.res, dev, num_workers, ForwardCache(), progress=False)
    _WORKER_CACHE[key] = work
    return work, True


def cluster_task(job: SplitJob, lo: int, hi: int) -> dict:
    """One dask task: claim and compute the units of rows [lo, hi); return counts."""
    from diffeat.extract.tasks import run_task

    work, loaded = _work_for(job)
    report = ExtractReport(model=job.config.model, dataset=job.config.dataset, store=job.config.store)
    before = {s.key: work.writers[s.key].written for s in job.settings}
    units = run_task(work, lo, hi, report)
    return {"units": units, "images": report.images, "forwards": report.forwards, "skipped": report.skipped,
            "written": {work.writers[k].path: work.writers[k].written - n for k, n in before.items()},
            "worker": f"{platform.node()}:{os.getpid()}", "model_loaded": loaded}


def run_on_cluster(client: Client, job: SplitJob, tasks: list[tuple[int, int]], report: ExtractReport, *,
                   gpu: bool) -> dict[str, int]:
    """Run ``tasks`` of ``job`` on the cluster; add images/forwards to ``report``; units written per array path."""
    from distributed import as_completed

    resources = {"GPU": 1} if gpu else None
    futures = [client.submit(cluster_task, job, lo, hi, resources=resources, pure=False,
                             key=f"diffeat-extract-{job.split}-{lo}-{os.getpid()}") for lo, hi in tasks]
    c = job.config
    written: dict[str, int] = {}
    workers: set[str] = set()
    bar = Progress(len(tasks), f"extract {c.dataset}/{job.split} on the cluster", enabled=c.progress)
    try:
        for future in as_completed(futures):
            r = future.result()  # re-raises a worker's error here
            report.images += r["images"]
            report.forwards += r["forwards"]
            report.skipped += r["skipped"]
            workers.add(r["worker"])
            report.model_loads[r["worker"]] = report.model_loads.get(r["worker"], 0) + r["model_loaded"]
            for path, n in r["written"].items():
                written[path] = written.get(path, 0) + n
            bar.update(1)
    finally:
        bar.close()
        for f in futures:
            f.cancel()
    logger.info("%s/%s: %d tasks on %d workers", c.dataset, job.split, len(tasks), len(workers))
    report.workers = sorted(workers | set(report.workers))
    return written
