"""The extract stage: images on disk -> frozen U-Net -> pooled block activations -> store.

One forward pass per (batch, t, noise draw) captures every requested block and
stops after the deepest; each block is pooled to every requested k. Each
(split, block, t, pool) is one *setting*: one array in the store, identified by a
hash of everything that determines its values. Complete settings are skipped
("cached"); partial ones resume at their first unwritten unit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffeat import __version__
from diffeat.devices import resolve_device
from diffeat.errors import DiffeatError
from diffeat.extract.distributed import SettingJob, SplitJob, run_on_cluster
from diffeat.extract.forward import COMPUTE_DTYPES
from diffeat.extract.tasks import SplitWork, plan_tasks, run_all
from diffeat.models.blocks import BlockInfo, block_table, check_blocks, model_inputs
from diffeat.models.noise import NOISE_RULE, check_timestep
from diffeat.store.layout import plan_chunks, setting_name, setting_path, settings_hash
from diffeat.store.reader import FeatureStore, open_store
from diffeat.store.writer import SettingWriter, write_sample_table

logger = logging.getLogger(__name__)

STORE_DTYPES = ("float16", "float32")
PREPROCESS = "guided-diffusion center_crop_arr (BOX halving, BICUBIC, center crop), x/127.5-1"
FEATURE_VERSION = 1  # bump when the meaning of stored values changes


@dataclass
class SettingResult:
    """What happened to one setting in an extract run."""

    split: str
    block: int
    t: int
    pool: int
    path: str
    shape: tuple[int, ...]
    outcome: str  # "cached" | "written" | "resumed" | "shared" | "incomplete"
    units_written: int = 0  # units this run (or its cluster) wrote

    def as_dict(self) -> dict:
        """JSON-friendly dict."""
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class ExtractReport:
    """Summary of an extract run."""

    model: str
    dataset: str
    store: str
    settings: list[SettingResult] = field(default_factory=list)
    images: int = 0
    forwards: int = 0
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)  # host:pid of cluster workers that ran tasks

    @property
    def images_per_second(self) -> float:
        """Images through the whole loop per second."""
        return self.images / self.seconds if self.seconds else 0.0


def _check_options(blocks, ts, pools, batch_size, dtype, store_dtype, noise_draws, limit) -> None:
    if not blocks:
        raise DiffeatError("give at least one --block")
    if not ts:
        raise DiffeatError("give at least one --t")
    for t in ts:
        check_timestep(t)
    for k in pools:
        if k < 1:
            raise DiffeatError(f"--pool {k} is invalid: pool sizes are integers >= 1 (the paper uses 1, 2, 4, 8)")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not hasattr(batch_size, "__index__")
                                 or batch_size < 1):
        raise DiffeatError(f"--batch-size {batch_size!r} is invalid: it must be an integer >= 1 or 'auto' "
                           "(the largest batch that fits GPU memory; a fixed size on CPU)")
    if dtype not in COMPUTE_DTYPES:
        raise DiffeatError(f"--dtype {dtype!r} is invalid: choose one of {', '.join(COMPUTE_DTYPES)}")
    if store_dtype not in STORE_DTYPES:
        raise DiffeatError(f"--store-dtype {store_dtype!r} is invalid: choose one of {', '.join(STORE_DTYPES)}")
    if noise_draws < 1:
        raise DiffeatError(f"--noise-draws {noise_draws} is invalid: it must be >= 1")
    if limit is not None and limit < 1:
        raise DiffeatError(f"--limit {limit} is invalid: it must be >= 1")


def _check_pools(table: list[BlockInfo], blocks: Sequence[int], pools: Sequence[int], resolution: int) -> None:
    for b in blocks:
        info = table[b - 1]
        for k in pools:
            if k > min(info.height, info.width):
                raise DiffeatError(
                    f"--pool {k} is larger than block {b}'s {info.height}x{info.width} map at resolution "
                    f"{resolution}: pool sizes for this block are 1..{min(info.height, info.width)}"
                )


def extract(
    *,
    dataset: str,
    model: str,
    blocks: Sequence[int],
    ts: Sequence[int],
    store: str | FeatureStore,
    pools: Sequence[int] = (1,),
    root: str | None = None,
    splits: Sequence[str] | None = None,
    classes: str | None = None,
    batch_size: int | str = 32,
    device: str = "auto",
    dtype: str = "float32",
    store_dtype: str = "float16",
    num_workers: int | None = None,
    seed: int = 0,
    noise_draws: int = 1,
    limit: int | None = None,
    resolution: int | None = None,
    progress: bool | None = None,
    chunk_rows: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    wait: bool = True,
    compile: bool | None = None,
) -> ExtractReport:
    """Extract pooled block features of ``model`` on ``dataset`` into ``store``.

    Every bad option is refused before the model is loaded or any image decoded
    (blocks, t and pool sizes against the computed block table). Returns what was
    cached, written or resumed. See the module docstring for the semantics.

    Several writers may work on one store at once: each unit is claimed before it is
    computed, and with ``wait`` this call returns only when every unit of its settings
    is written (by it or by the others). ``scheduler`` (a dask scheduler address) or
    ``workers`` (a local dask cluster of that many processes) spread the units over a
    cluster (``diffeat.extract.distributed``). ``chunk_rows`` forces smaller units.
    ``compile``: ``torch.compile`` the truncated forward (default: on CUDA only).
    """
    from diffeat.data import open_dataset
    from diffeat.models.loading import load_model

    blocks, ts, pools = sorted(set(blocks)), sorted(set(ts)), sorted(set(pools))
    _check_options(blocks, ts, pools, batch_size, dtype, store_dtype, noise_draws, limit)
    dev = resolve_device(device)

    layout = open_dataset(dataset, root, classes=classes)
    split_names = list(splits) if splits else list(layout.standard_splits)
    if split_names == ["all"]:
        split_names = list(layout.splits)
    tables = {}
    for split in split_names:
        table = layout.samples(split)
        tables[split] = table.head(limit) if limit is not None else table
        tables[split].check_files()

    if scheduler is not None and workers is not None:
        raise DiffeatError("give --scheduler (an existing dask cluster) or --workers (a local one), not both")
    if workers is not None and workers < 1:
        raise DiffeatError(f"--workers {workers} is invalid: it must be >= 1")
    if chunk_rows is not None:
        plan_chunks(1, 1, chunk_rows)  # checks it is a power of two

    fs = store if isinstance(store, FeatureStore) else open_store(store, mode="a")
    fs.check_writable()  # read-only credentials fail here, before the model is loaded

    loaded = load_model(model)
    unet = loaded.unet
    res = resolution or loaded.resolution
    table = block_table(unet, res)
    check_blocks(blocks, len(table))
    _check_pools(table, blocks, pools, res)
    model_inputs(unet, 1, "cpu", torch.float32)  # refuses class-conditional models now, not mid-run

    report = ExtractReport(model=loaded.name, dataset=dataset, store=fs.location)
    run = _Run(fs, loaded, table, blocks, ts, pools, res, dev, dtype, store_dtype, batch_size, num_workers, seed,
               noise_draws, progress, chunk_rows, wait, compile, (model, dataset, root, classes, limit, device))
    start = time.perf_counter()
    with _cluster(scheduler, workers, dev) as client:
        for tab in tables.values():
            _extract_split(run, tab, report, client)
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class _Run:
    """The resolved options of one extract call (what every split shares)."""

    fs: FeatureStore
    loaded: object
    table: list[BlockInfo]
    blocks: list[int]
    ts: list[int]
    pools: list[int]
    res: int
    dev: torch.device
    dtype: str
    store_dtype: str
    batch_size: int | str
    num_workers: int | None
    seed: int
    draws: int
    progress: bool | None
    chunk_rows: int | None
    wait: bool
    compile: bool | None
    source: tuple  # (model, dataset, root, classes, limit, device) as given, for cluster workers


@contextlib.contextmanager
def _cluster(scheduler: str | None, workers: int | None, dev: torch.device):
    if scheduler is None and workers is None:
        yield None
        return
    from diffeat.cluster import cluster_client

    with cluster_client(scheduler, workers, resources={"GPU": 1} if dev.type == "cuda" else None) as client:
        yield client


def _settings(loaded, tab, info: BlockInfo, t: int, k: int, res: int, seed: int, draws: int, dtype: str,
              store_dtype: str) -> dict:
    """Everything that determines a setting's values (and nothing else): its identity."""
    return {
        "feature_version": FEATURE_VERSION,
        "model": {"name": loaded.name, "weights_sha256": loaded.weights_sha256},
        "dataset": {"name": tab.dataset, "split": tab.split, "manifest_sha256": tab.manifest_sha256()},
        "block": info.index, "module": info.module, "t": t, "pool": k, "resolution": res,
        "preprocess": PREPROCESS,
        "noise": {"schedule": "linear 1e-4..0.02, 1000 steps", "rule": NOISE_RULE, "seed": seed, "draws": draws},
        "compute_dtype": dtype, "store_dtype": store_dtype,
    }


def _extract_split(run: _Run, tab, report: ExtractReport, client) -> None:
    fs, loaded = run.fs, run.loaded
    write_sample_table(fs, tab)
    jobs: list[SettingJob] = []
    for b in run.blocks:
        info = run.table[b - 1]
        for t in run.ts:
            for k in run.pools:
                settings = _settings(loaded, tab, info, t, k, run.res, run.seed, run.draws, run.dtype,
                                     run.store_dtype)
                digest = settings_hash(settings)
                attrs = {
                    "settings": settings, "settings_hash": digest, "manifest_sha256": tab.manifest_sha256(),
                    "setting": {"model": loaded.name, "dataset": tab.dataset, "split": tab.split,
                                "block": b, "t": t, "pool": k, "name": None},
                    "model": loaded.describe(), "block_info": info.as_dict(),
                    "versions": {"diffeat": __version__, "torch": torch.__version__},
                }
                jobs.append(SettingJob((b, t, k), setting_path(loaded.name, tab.dataset, tab.split,
                                                               setting_name(b, t, k, digest)),
                                       (len(tab), info.channels, k, k), attrs, f"{tab.split} block {b} t {t} pool {k}"))
    opened = {j.key: SettingWriter.open(fs, j.path, j.shape, run.store_dtype, j.attrs, j.label,
                                        chunk_rows=run.chunk_rows) for j in jobs}
    at_open = {key: set(w.pending) for key, w in opened.items()}
    for w in opened.values():
        if not w.pending:
            logger.info("cached: %s (%s)", w.path, w.label)
    work = SplitWork(loaded.unet, tab, opened, run.blocks, run.ts, run.pools, run.res, run.dev, run.dtype,
                     run.batch_size, run.num_workers, run.seed, run.draws, run.progress, run.compile)
    by_cluster: dict[str, int] = {}
    if client is not None and work.pending():
        model, dataset, root, classes, limit, device = run.source
        job = SplitJob(_absolute(fs.location), fs.storage_options, model, loaded.weights_sha256, dataset,
                       _absolute(root) if root else None, _absolute(classes) if classes else None, tab.split,
                       limit, tab.manifest_sha256(), tuple(jobs), tuple(run.blocks), tuple(run.ts),
                       tuple(run.pools), run.res, device, run.dtype, run.store_dtype, run.batch_size,
                       run.num_workers, run.seed, run.draws, run.chunk_rows, run.compile)
        by_cluster = run_on_cluster(client, job, plan_tasks(work.pending(), len(tab), work.task_rows), report,
                                    gpu=run.dev.type == "cuda", progress=run.progress)
        for w in opened.values():
            w.refresh()
    # Units nobody has written yet (all of them without a cluster; those whose claims other
    # writers hold or held) are computed or waited for here.
    run_all(work, report, wait=run.wait)
    for (b, t, k), w in opened.items():
        mine = w.written + by_cluster.get(w.path, 0)
        if not at_open[(b, t, k)]:
            outcome = "cached"
        elif not w.publish():
            outcome = "incomplete"
        elif mine < len(at_open[(b, t, k)]):
            outcome = "shared"  # other writers wrote some of the units at the same time
        else:
            outcome = "resumed" if len(at_open[(b, t, k)]) < w.plan.n_units else "written"
        report.settings.append(SettingResult(tab.split, b, t, k, w.path, tuple(w.array.shape), outcome, mine))


def _absolute(location: str) -> str:
    """Workers run elsewhere: local paths go to them absolute."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))
