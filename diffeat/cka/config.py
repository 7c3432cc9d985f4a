"""``CkaConfig``: every option of the CKA stage (``diffeat cka``), in one frozen record.

The CLI, the library (``store_cka``/``run_cka``), a pipeline's ``cka`` stage (its option list
is these fields) and the ``cka.json`` record all use it. The settings compared are given
as text, as on the command line: ``a``/``b`` (``block=24,t=90,pool=1`` or an import name),
plus a grid ``blocks`` × ``ts`` × ``pools`` and imported ``names`` added to the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffeat.cka.estimators import ESTIMATORS, KERNELS
from diffeat.cka.plan import PRECISIONS, ROUTES
from diffeat.cka.settings import SettingSpec, grid
from diffeat.errors import DiffeatError
from diffeat.runtime.checks import check_at_least, check_choice
from diffeat.runtime.stageconfig import StageConfig, as_ints, as_strs


@dataclass(frozen=True)
class CkaConfig(StageConfig):
    """Options of ``diffeat cka`` (see ``diffeat cka --help`` for each one's meaning)."""

    stage = "cka"

    store: str
    dataset: str
    storage_options: dict | None = field(default=None, hash=False, metadata={"secret": True})
    split: str | None = None  # None: the test split of the dataset's standard pair among the stored splits
    model: str | None = None
    a: tuple[str, ...] = ()
    b: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()
    ts: tuple[int, ...] = ()
    pools: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    kernel: str = "linear"
    estimator: str = "unbiased"
    route: str = "auto"
    precision: str = "float64"
    memory_budget: str | int | None = None
    block_rows: int | None = None
    batch_size: int = 512
    passes: int = 1
    seed: int = 0
    rbf_threshold: float = 1.0
    subsample: int | None = None
    threads: int | None = None
    scheduler: str | None = None
    workers: int | None = None
    out: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        from diffeat.runtime.cluster import check_cluster_options
        from diffeat.runtime.memory import memory_budget
        from diffeat.store.location import check_location

        self._set("store", check_location(self.store))
        if self.out is not None:
            self._set("out", check_location(self.out, "--out"))
        for name in ("a", "b", "names"):
            self._set(name, as_strs(getattr(self, name)))
        for name, flag in (("blocks", "--block"), ("ts", "--t"), ("pools", "--pool")):
            self._set(name, as_ints(getattr(self, name), flag))
        check_choice(self.kernel, KERNELS, "--kernel")
        check_choice(self.estimator, ESTIMATORS, "--estimator")
        check_choice(self.route, ROUTES, "--route")
        check_choice(self.precision, PRECISIONS, "--precision")
        if self.kernel == "rbf" and self.route not in ("auto", "gram"):
            raise DiffeatError(f"RBF CKA needs n×n Gram matrices: --route {self.route} is for the linear kernel only")
        check_at_least(self.passes, 1, "--passes", what="an integer")
        check_at_least(self.batch_size, 2, "--batch-size", what="an integer")
        if self.subsample is not None:
            check_at_least(self.subsample, 4, "--subsample", what="an integer")
        if self.block_rows is not None:
            check_at_least(self.block_rows, 1, "--block-rows", what="an integer")
        if self.memory_budget is not None:
            memory_budget(self.memory_budget)
        if self.threads is not None:
            check_at_least(self.threads, 1, "--threads", what="an integer")
        check_cluster_options(self.scheduler, self.workers)
        if not self.rows():
            raise DiffeatError("give the settings to compare: --a (and --b), or --block/--t/--pool, or --name")

    def rows(self) -> list[SettingSpec]:
        """The row settings: ``a``, then the grid, then the imported ``names``."""
        specs = [spec for s in self.a for spec in SettingSpec.parse_all(s)]
        specs += grid(self.blocks, self.ts, self.pools)
        specs += [SettingSpec.parse(f"name={n}") for n in self.names]
        return specs

    def cols(self) -> list[SettingSpec] | None:
        """The column settings (None: the rows against themselves)."""
        return [spec for s in self.b for spec in SettingSpec.parse_all(s)] or None
