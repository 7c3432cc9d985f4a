"""The extract stage: images on disk -> frozen U-Net -> pooled block activations -> store.

One forward pass per (batch, t, noise draw) captures every requested block and
stops after the deepest; each block is pooled to every requested k. Each
(split, block, t, pool) is one *setting*: one array in the store, identified by a
hash of everything that determines its values. Complete settings are skipped
("cached"); partial ones resume at their first unwritten unit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffeat import __version__
from diffeat.devices import resolve_device
from diffeat.errors import DiffeatError
from diffeat.extract.forward import COMPUTE_DTYPES, run_forward
from diffeat.models.blocks import BlockInfo, block_table, check_blocks, model_inputs
from diffeat.models.noise import NOISE_RULE, check_timestep
from diffeat.store.layout import setting_name, setting_path, settings_hash
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
    outcome: str  # "cached" | "written" | "resumed" | "incomplete"

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
    if batch_size < 1:
        raise DiffeatError(f"--batch-size {batch_size} is invalid: it must be >= 1")
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
    batch_size: int = 32,
    device: str = "auto",
    dtype: str = "float32",
    store_dtype: str = "float16",
    num_workers: int | None = None,
    seed: int = 0,
    noise_draws: int = 1,
    limit: int | None = None,
    resolution: int | None = None,
    progress: bool | None = None,
) -> ExtractReport:
    """Extract pooled block features of ``model`` on ``dataset`` into ``store``.

    Every bad option is refused before the model is loaded or any image decoded
    (blocks, t and pool sizes against the computed block table). Returns what was
    cached, written or resumed. See the module docstring for the semantics.
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
    start = time.perf_counter()
    for split, tab in tables.items():
        _extract_split(fs, loaded, tab, table, blocks, ts, pools, res, dev, dtype, store_dtype, batch_size,
                       num_workers, seed, noise_draws, progress, report)
    report.seconds = time.perf_counter() - start
    return report


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


def _extract_split(fs, loaded, tab, table, blocks, ts, pools, res, dev, dtype, store_dtype, batch_size,
                   num_workers, seed, draws, progress, report) -> None:
    write_sample_table(fs, tab)
    opened: dict[tuple[int, int, int], SettingWriter] = {}
    for b in blocks:
        info = table[b - 1]
        for t in ts:
            for k in pools:
                settings = _settings(loaded, tab, info, t, k, res, seed, draws, dtype, store_dtype)
                digest = settings_hash(settings)
                path = setting_path(loaded.name, tab.dataset, tab.split, setting_name(b, t, k, digest))
                attrs = {
                    "settings": settings, "settings_hash": digest, "manifest_sha256": tab.manifest_sha256(),
                    "setting": {"model": loaded.name, "dataset": tab.dataset, "split": tab.split,
                                "block": b, "t": t, "pool": k, "name": None},
                    "model": loaded.describe(), "block_info": info.as_dict(),
                    "versions": {"diffeat": __version__, "torch": torch.__version__},
                }
                opened[(b, t, k)] = SettingWriter.open(fs, path, (len(tab), info.channels, k, k), store_dtype,
                                                       attrs, label=f"{tab.split} block {b} t {t} pool {k}")
    pending = {key: w for key, w in opened.items() if w.pending}
    outcomes = {key: ("cached" if not w.pending else
                      "resumed" if len(w.pending) < w.plan.n_units else "written") for key, w in opened.items()}
    for w in opened.values():
        if not w.pending:
            logger.info("cached: %s (%s)", w.path, w.label)
    if pending:
        rows = np.unique(np.concatenate([w.rows_needed() for w in pending.values()]))
        run_forward(loaded.unet, tab, rows, pending, blocks, ts, pools, res, dev, dtype, batch_size,
                     num_workers, seed, draws, progress, report)
    for (b, t, k), w in opened.items():
        outcome = outcomes[(b, t, k)] if w.publish() else "incomplete"
        report.settings.append(SettingResult(tab.split, b, t, k, w.path, tuple(w.array.shape), outcome))
