"""What a probe run produces: per-head results, the run report, CSV rows and saved heads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from diffeat.heads import Probe
from diffeat.heads.io import save_probe
from diffeat.store import FeatureSet

CSV_COLUMNS = ("run_id", "model", "dataset", "train_split", "test_split", "block", "t", "pool", "name", "head",
               "hparams", "selected", "refit", "n_train", "split", "metric", "value")


@dataclass
class HeadResult:
    """The outcome of one head on one setting.

    ``val`` are the chosen grid point's validation metrics (fit rows only, before
    any refit); ``test`` the final head's test metrics; ``grid`` every grid point
    as ``{"hparams", "val": {...}}``. Accuracies are fractions in [0, 1].
    """

    head: str
    model: str
    dataset: str
    block: int | None
    t: int | None
    pool: int | None
    name: str | None
    hparams: dict
    val: dict[str, float]
    test: dict[str, float]
    grid: list[dict]
    refit: bool
    n_train: int
    seconds: float
    n_params: int | None = None
    weights: str | None = None
    passes: int | None = None  # reads of a streamed training split by the L-BFGS fit (0: held in memory)

    def summary(self) -> dict:
        """The ``--json`` record: head, setting, top1/top5/val_top1 (fractions), hyperparameters."""
        return {"head": self.head, "model": self.model, "dataset": self.dataset, "block": self.block, "t": self.t,
                "pool": self.pool, "name": self.name, "top1": self.test["top1"], "top5": self.test["top5"],
                "balanced_acc": self.test["balanced_acc"], "val_top1": self.val["top1"], "hparams": self.hparams,
                "refit": self.refit, "n_train": self.n_train, "seconds": round(self.seconds, 3),
                "weights": self.weights}


@dataclass
class ProbeReport:
    """All results of a probe run and where they were written."""

    run_dir: Path
    results: list[HeadResult] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summaries(self) -> list[dict]:
        """One ``HeadResult.summary()`` per (setting, head)."""
        return [r.summary() for r in self.results]


def save_heads(run_dir: Path, train_fs: FeatureSet, outcomes: list[tuple[HeadResult, Probe | None]]) -> None:
    """Write each final probe as ``heads/<model>_<dataset>_<setting>_<head>.safetensors``."""
    info = train_fs.info
    folder = run_dir / "heads"
    folder.mkdir(exist_ok=True)
    for r, module in outcomes:
        if module is None:
            continue
        stem = f"{info.model}_{info.dataset}_{info.label().replace('/', '_')}_{r.head}"
        path = save_probe(folder / f"{stem}.safetensors", module, head=r.head,
                          feature_shape=tuple(train_fs.array.shape[1:]), class_names=list(train_fs.class_names),
                          meta={"setting": info.as_dict(), "hparams": r.hparams, "test": r.test, "val": r.val})
        r.weights = str(path)


def csv_rows(run_id: str, r: HeadResult, train_split: str, test_split: str) -> list[dict]:
    """Long-format rows of one result: every grid point's validation metrics, then the test metrics."""
    base = {"run_id": run_id, "model": r.model, "dataset": r.dataset, "train_split": train_split,
            "test_split": test_split, "block": r.block, "t": r.t, "pool": r.pool, "name": r.name, "head": r.head,
            "refit": r.refit}
    rows = []
    for g in r.grid:
        selected = g["hparams"] == r.hparams
        for metric, value in g["val"].items():
            rows.append({**base, "hparams": g["hparams"], "selected": selected, "n_train": None, "split": "val",
                         "metric": metric, "value": value})
        objective = g.get("objective")
        if objective is not None and math.isfinite(objective):  # convex heads: CE + wd/2 ‖W‖² on the fit rows
            rows.append({**base, "hparams": g["hparams"], "selected": selected, "n_train": None, "split": "fit",
                         "metric": "objective", "value": objective})
    for metric, value in r.test.items():
        rows.append({**base, "hparams": r.hparams, "selected": True, "n_train": r.n_train, "split": "test",
                     "metric": metric, "value": value})
    return rows
