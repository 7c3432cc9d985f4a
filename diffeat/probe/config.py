"""``ProbeConfig``: every option of the probe stage, in one frozen record.

The CLI (``diffeat probe``), the library (``probe(**kw)`` builds one), a pipeline's
``probe`` stage (its option list is these fields) and the run's ``run.json`` all use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diffeat.errors import DiffeatError
from diffeat.runtime.checks import check_at_least, check_choice
from diffeat.runtime.stageconfig import StageConfig, as_floats, as_ints, as_strs

#: How features are standardised before a head sees them (statistics from training rows only).
STANDARDIZE_MODES = ("feature", "channel", "none")
#: How the linear head is trained: ``lbfgs`` (full-batch L-BFGS multinomial logistic regression
#: along a warm-started C path, ``diffeat.probe.lbfgs``) or ``paper`` (the one-pass SGD grid over
#: learning rate × weight decay, as the paper trains its heads).
RECIPES = ("lbfgs", "paper")
#: The heads trained by SGD/AdamW whatever the recipe (``--lr``/``--wd`` apply to them).
_GRID_ONLY_HEADS = ("mlp", "cnn", "attention")


@dataclass(frozen=True)
class ProbeConfig(StageConfig):
    """Options of ``diffeat probe`` (see ``diffeat probe --help`` for each one's meaning).

    ``blocks``/``ts``/``pools``: the settings to probe (their product); empty matches whatever
    single value the store holds. ``lrs``/``wds``/``cs``: the grids (None: each head's
    defaults). ``head_options``: per-head module options, e.g. ``{"mlp": {"hidden": [1024]}}``.
    ``memory_budget``: bytes (or ``"8G"``) a split may take in RAM before it is streamed.
    ``scheduler``/``workers``: a dask cluster for the statistics pass of streamed splits.
    """

    stage = "probe"

    store: str
    dataset: str
    out: str = "results"
    storage_options: dict | None = field(default=None, hash=False, metadata={"secret": True})
    model: str | None = None
    name: str | None = None
    blocks: tuple[int, ...] = ()
    ts: tuple[int, ...] = ()
    pools: tuple[int, ...] = ()
    heads: tuple[str, ...] = ("linear",)
    recipe: str = "lbfgs"
    train_split: str | None = None  # None: the dataset's standard pair among the stored splits
    test_split: str | None = None
    val_fraction: float = 0.1
    lrs: tuple[float, ...] | None = None
    wds: tuple[float, ...] | None = None
    cs: tuple[float, ...] | None = None
    epochs: int = 30
    min_steps: int = 1000
    batch_size: int = 256
    standardize: str = "feature"
    refit: bool = True
    head_options: dict = field(default_factory=dict, hash=False)
    knn_k: int = 20
    knn_temperature: float = 0.07
    device: str = "auto"
    memory_budget: str | int | None = None
    seed: int = 0
    threads: int | None = None
    save_weights: bool = True
    progress: bool | None = None
    scheduler: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        from diffeat.heads import HEADS, get_head
        from diffeat.runtime.cluster import check_cluster_options
        from diffeat.runtime.memory import memory_budget
        from diffeat.store.location import check_location

        self._set("store", check_location(self.store))
        self._set("out", check_location(self.out, "--out"))
        for name, flag in (("blocks", "--block"), ("ts", "--t"), ("pools", "--pool")):
            self._set(name, as_ints(getattr(self, name), flag))
        self._set("heads", as_strs(self.heads))
        if not self.heads:
            raise DiffeatError(f"give at least one --head ({', '.join(HEADS)})")
        for h in self.heads:
            get_head(h)
        check_choice(self.standardize, STANDARDIZE_MODES, "--standardize")
        check_choice(self.recipe, RECIPES, "--recipe")
        if self.epochs < 1 or self.batch_size < 2 or self.min_steps < 0:
            raise DiffeatError(f"--epochs must be >= 1, --batch-size >= 2 and --min-steps >= 0 "
                               f"(got {self.epochs}, {self.batch_size}, {self.min_steps})")
        if not 0.0 < self.val_fraction < 1.0:
            raise DiffeatError(f"--val-fraction must be in (0, 1), not {self.val_fraction}")
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise DiffeatError(f"--knn-k must be >= 1 and --knn-t > 0 (got {self.knn_k}, {self.knn_temperature})")
        for name, flag, positive in (("lrs", "--lr", True), ("wds", "--wd", False), ("cs", "--C", True)):
            values = as_floats(getattr(self, name), flag)
            bad = [v for v in values or () if not math.isfinite(v) or (v <= 0 if positive else v < 0)]
            if bad:
                raise DiffeatError(f"{flag} values must be {'> 0' if positive else '>= 0'} and finite, not {bad}")
            self._set(name, values)
        options = {str(k): dict(v) for k, v in (self.head_options or {}).items()}
        for h in options:
            get_head(h)
        self._set("head_options", options)
        if self.recipe == "lbfgs" and "linear" in self.heads:
            if options.get("linear", {}).get("batchnorm"):
                raise DiffeatError("--linear-bn belongs to the SGD grid (BatchNorm statistics of minibatches): use "
                                   "--recipe paper, or keep --recipe lbfgs with --standardize feature")
            if (self.lrs is not None or self.wds is not None) and not set(self.heads) & set(_GRID_ONLY_HEADS):
                raise DiffeatError("--lr and --wd set the SGD grid of --recipe paper; the lbfgs recipe's linear head "
                                   "searches C (--C): drop them, or use --recipe paper")
        if self.memory_budget is not None:
            memory_budget(self.memory_budget)  # a bad size fails here, not after the store is opened
        if self.threads is not None:
            check_at_least(self.threads, 1, "--threads", what="an integer")
        check_cluster_options(self.scheduler, self.workers)
