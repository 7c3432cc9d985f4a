"""The extract stage: images on disk -> frozen diffusion model -> pooled block activations -> store.

Any model family (``diffeat.models.families``): pixel U-Nets see the noised image,
latent models its VAE latents, noised with the model's own schedule and run with
the family's null conditioning; vision backbones see the image preprocessed by their
own image processor, without noise, and their settings have no t. One forward pass per
(batch, t, noise draw) captures every requested block and stops after the deepest; each
block is pooled to every requested k. Each
(split, block, t, pool) is one *setting*: one array in the store, identified by a
hash of everything that determines its values. Complete settings are skipped
("cached"); partial ones resume at their first unwritten unit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from diffeat import __version__
from diffeat.errors import DiffeatError
from diffeat.extract.config import ExtractConfig
from diffeat.extract.distributed import SettingJob, SplitJob, run_on_cluster
from diffeat.extract.forward import ForwardCache, default_workers
from diffeat.extract.results import ExtractReport, SettingResult
from diffeat.extract.tasks import plan_tasks, run_all
from diffeat.extract.work import SplitWork
from diffeat.models.blocks import BlockInfo
from diffeat.models.families.base import block_info, check_table_blocks
from diffeat.models.noise import NOISE_RULE
from diffeat.runtime.cluster import cluster_client
from diffeat.runtime.devices import resolve_device
from diffeat.store.layout import setting_name, setting_path, settings_hash
from diffeat.store.objects import disk_error
from diffeat.store.reader import (
    FeatureStore,
    as_store,
    check_writable_location,
    store_option,
)
from diffeat.store.writer import SettingWriter, write_sample_table

if TYPE_CHECKING:
    from distributed import Client

    from diffeat.data.table import SampleTable
    from diffeat.models.loading import LoadedModel

logger = logging.getLogger(__name__)

PREPROCESS = "guided-diffusion center_crop_arr (BOX halving, BICUBIC, center crop), x/127.5-1"
FEATURE_VERSION = 1  # bump when the meaning of stored values changes


def extract(**options: Any) -> ExtractReport:
    """Extract pooled block features into a store: ``extract(dataset=..., model=..., blocks=[24], ts=[90],
    store=...)``.

    The keyword arguments are the fields of :class:`~diffeat.extract.config.ExtractConfig`
    (one record for the CLI, the library and pipelines); ``store`` may also be an open
    ``FeatureStore``. See :func:`run_extract`.
    """
    options, store = store_option(options)
    return run_extract(ExtractConfig(**options), store=store)


def run_extract(config: ExtractConfig, *, store: FeatureStore | None = None) -> ExtractReport:
    """Extract pooled block features of ``config.model`` on ``config.dataset`` into ``config.store``.

    Every bad option is refused before the model is loaded or any image decoded (the record
    checks itself; blocks and pool sizes are checked against the computed block table
    before any image is read). Returns what was cached, written or resumed. ``store``: the
    store already open (else it is opened from ``config.store``).

    Several writers may work on one store at once: each unit is claimed before it is
    computed, and with ``config.wait`` this call returns only when every unit of its
    settings is written (by it or by the others). ``config.scheduler`` (a dask scheduler
    address) or ``config.workers`` (a local dask cluster of that many processes) spread the
    units over a cluster (``diffeat.extract.distributed``). ``config.chunk_rows`` forces
    smaller units.
    """
    c = config
    dev = resolve_device(c.device)
    # Read-only credentials fail first, before the model is looked at or loaded; nothing is created yet:
    # a run refused below (a model or block that does not exist, a bad pool size) leaves no store behind.
    if store is not None:
        store.check_writable()
    else:
        check_writable_location(c.store, c.storage_options)
    check_timesteps(c)  # from the model's config files: before any data is read
    tables = _sample_tables(c)
    loaded, res, table = _load_checked(c)
    try:
        fs = as_store(store if store is not None else c.store, mode="a", storage_options=c.storage_options)
        report = ExtractReport(model=loaded.name, dataset=c.dataset, store=fs.location, config=c.as_dict())
        run = _Run(c, fs, loaded, table, res, dev, ForwardCache())
        start = time.perf_counter()
        with cluster_client(c.scheduler, c.workers, resources={"GPU": 1} if dev.type == "cuda" else None) as client:
            for tab in tables.values():
                _extract_split(run, tab, report, client)
    except OSError as e:
        full = disk_error(c.store, e)  # a full disk is the user's to fix: one line, and the run resumes
        if full is None:
            raise
        raise full from None
    report.seconds = time.perf_counter() - start
    return report


def check_extract(config: ExtractConfig) -> None:
    """Every check ``run_extract`` makes before it computes, without writing anything (``diffeat run --dry-run``).

    The device, the dataset's splits and files, the model, and the blocks and pool sizes
    against the model's computed block table.
    """
    resolve_device(config.device)
    check_timesteps(config)
    _sample_tables(config)
    _load_checked(config)


def check_timesteps(config: ExtractConfig) -> None:
    """``--t`` as the model needs it, decided from its config files alone (no weight, no image is read).

    Diffusion models need at least one t; vision backbones take none (their settings have no
    t), nor noise draws. A missing weight file or an unsupported ``model_type`` of a vision
    folder is refused here too (``peek_family``).
    """
    from diffeat.models.loading import peek_family

    family = peek_family(config.model)
    if family.timestep and not config.ts:
        raise DiffeatError(f"give at least one --t: {config.model} is a {family.name} diffusion model, run on images "
                           "noised to its training timesteps t (0..999)")
    if not family.timestep and config.ts:
        raise DiffeatError(f"--t {config.ts[0]} does not apply to {config.model}: a {family.name} model "
                           "(a backbone run on the clean image) has no timestep; drop --t")
    if not family.timestep and config.noise_draws != 1:
        raise DiffeatError(f"--noise-draws {config.noise_draws} does not apply to {config.model}: a {family.name} "
                           "model sees the clean image, without noise")


def _sample_tables(c: ExtractConfig) -> dict[str, SampleTable]:
    """The sample table of each split to extract (``--limit`` applied), every file checked to exist."""
    from diffeat.data import open_dataset

    layout = open_dataset(c.dataset, c.root, classes=c.classes)
    split_names = list(c.splits) or list(layout.standard_splits)
    if split_names == ["all"]:
        split_names = list(layout.splits)
    tables = {}
    for split in split_names:
        table = layout.samples(split)
        tables[split] = table.head(c.limit) if c.limit is not None else table
        tables[split].check_files()
    return tables


def _load_checked(c: ExtractConfig) -> tuple[LoadedModel, int, list[BlockInfo]]:
    """The model, its input resolution and block table, with the blocks and pool sizes checked against it."""
    from diffeat.models.loading import load_model

    loaded = load_model(c.model)
    model = loaded.model
    res = c.resolution or loaded.resolution
    table = model.block_table(res)  # refuses a resolution the model cannot take
    check_table_blocks(c.blocks, table)
    if model.schedule is None and c.ts:  # peek_family decided from the config files; the model agrees
        raise DiffeatError(f"--t {c.ts[0]} does not apply to {c.model}: a {model.family} model has no timestep")
    for t in c.ts:
        model.schedule.check_timestep(t)  # the record checked 0..999; this is the model's own range
    _check_pools(table, c.blocks, c.pools, res)
    model.check_unconditional()  # refuses class-conditional models now, not mid-run
    return loaded, res, table


@dataclass
class _Run:
    """What one extract call resolved from its record, shared by its splits."""

    config: ExtractConfig
    fs: FeatureStore
    loaded: LoadedModel
    table: list[BlockInfo]
    res: int
    dev: torch.device
    forwards: ForwardCache


def _check_pools(table: list[BlockInfo], blocks: Sequence[int], pools: Sequence[int], resolution: int) -> None:
    for b in blocks:
        info = block_info(table, b)
        for k in pools:
            if k > min(info.height, info.width):
                raise DiffeatError(
                    f"--pool {k} is larger than block {b}'s {info.height}x{info.width} map at resolution "
                    f"{resolution}: pool sizes for this block are 1..{min(info.height, info.width)}"
                )


def _settings(loaded: LoadedModel, tab: SampleTable, info: BlockInfo, t: int | None, k: int, res: int, seed: int,
              draws: int, dtype: str, store_dtype: str) -> dict:
    """Everything that determines a setting's values (and nothing else): its identity.

    Pixel U-Nets give exactly the fields every store has recorded (their family adds
    nothing, ADM's schedule is described as it always was), so stores written before
    model families existed keep their settings hash. Other families add a ``family``
    record: VAE, conditioning, schedule (``FeatureModel.identity``). A model without a
    timestep (``t`` is None: a vision backbone) has no ``t`` and no ``noise``, and its
    ``preprocess`` is the rule of its own image processor.
    """
    model = loaded.model
    settings = {
        "feature_version": FEATURE_VERSION,
        "model": {"name": loaded.name, "weights_sha256": loaded.weights_sha256},
        "dataset": {"name": tab.dataset, "split": tab.split, "manifest_sha256": tab.manifest_sha256()},
        "block": info.index, "module": info.module, "pool": k, "resolution": res,
        "compute_dtype": dtype, "store_dtype": store_dtype,
    }  # the hash is of canonical (key-sorted) JSON: the order of the keys here does not matter
    if t is None:
        settings.update(preprocess=model.preprocessing.at(res).identity(), family=model.identity(res))
        return settings
    settings.update(t=t, preprocess=PREPROCESS,
                    noise={"schedule": model.schedule.describe(), "rule": NOISE_RULE, "seed": seed, "draws": draws})
    family = model.identity(res)
    if family:
        settings["family"] = family
    return settings


def _extract_split(run: _Run, tab: SampleTable, report: ExtractReport, client: Client | None) -> None:
    c, fs, loaded = run.config, run.fs, run.loaded
    write_sample_table(fs, tab)
    jobs: list[SettingJob] = []
    for b in c.blocks:
        info = block_info(run.table, b)
        for t in c.setting_ts():
            for k in c.pools:
                settings = _settings(loaded, tab, info, t, k, run.res, c.seed, c.noise_draws, c.dtype, c.store_dtype)
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
    opened = {j.key: SettingWriter.open(fs, j.path, j.shape, c.store_dtype, j.attrs, j.label,
                                        chunk_rows=c.chunk_rows) for j in jobs}
    at_open = {key: set(w.pending) for key, w in opened.items()}
    for w in opened.values():
        if not w.pending:
            logger.debug("cached: %s (%s)", w.path, w.label)
    num_workers = c.num_workers if c.num_workers is not None else default_workers(run.dev)
    work = SplitWork(c, loaded.model, tab, opened, run.res, run.dev, num_workers, run.forwards, progress=c.progress)
    by_cluster: dict[str, int] = {}
    if client is not None and work.pending():
        job = SplitJob(c.for_workers(), tab.split, loaded.weights_sha256, tab.manifest_sha256(), run.res,
                       tuple(jobs))
        by_cluster = run_on_cluster(client, job, plan_tasks(work.pending(), len(tab), work.task_rows), report,
                                    gpu=run.dev.type == "cuda")
        for w in opened.values():
            w.refresh()
    # Units nobody has written yet (all of them without a cluster; those whose claims other
    # writers hold or held) are computed or waited for here.
    run_all(work, report, wait=c.wait)
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
