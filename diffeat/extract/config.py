"""``ExtractConfig``: every option of the extract stage, in one frozen record.

The CLI (``diffeat extract``), the library (``extract(**kw)`` builds one), a pipeline's
``extract`` stage (its option list is these fields), the dask job sent to workers and the
run's JSON record all use this one record, so an option is named, defaulted and checked in
one place. What determines the stored values (model, dataset, block, t, pool, seed, draws,
dtypes, resolution) goes into each setting's identity hash in ``extract.run``; the rest
(batch size, workers, device) only decides how fast they are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffeat.errors import DatasetError, DiffeatError
from diffeat.runtime.checks import check_at_least, check_choice
from diffeat.runtime.stageconfig import StageConfig, as_ints, as_strs
from diffeat.store.layout import STORE_DTYPES

#: Compute precisions of the forward (``--dtype``).
COMPUTE_DTYPE_NAMES = ("float32", "bfloat16", "float16")

#: What an image that cannot be decoded does (``--on-bad-image``): end the run with one line naming
#: the file (finished units are kept), or store its row as NaN, recorded with its id and reason.
BAD_IMAGE_POLICIES = ("fail", "skip")

#: Largest input resolution (``--resolution``): 8x ADM-512's; a 100,000 px input overflowed torch's
#: size computation with a traceback.
MAX_RESOLUTION = 4096


@dataclass(frozen=True)
class ExtractConfig(StageConfig):
    """Options of ``diffeat extract`` (see ``diffeat extract --help`` for each one's meaning)."""

    stage = "extract"

    dataset: str
    model: str
    blocks: tuple[int, ...]
    store: str
    ts: tuple[int, ...] = ()  # required for diffusion models, refused for vision backbones (checked against the model)
    pools: tuple[int, ...] = (1,)
    storage_options: dict | None = field(default=None, hash=False, metadata={"secret": True})
    root: str | None = None
    splits: tuple[str, ...] = ()  # () = the dataset's standard pair; ("all",) = every split
    classes: str | None = None
    limit: int | None = None
    resolution: int | None = None
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    store_dtype: str = "float16"
    num_workers: int | None = None
    seed: int = 0
    noise_draws: int = 1
    chunk_rows: int | None = None
    scheduler: str | None = None
    workers: int | None = None
    wait: bool = True
    compile: bool | None = None
    progress: bool | None = None
    # Not part of a setting's identity: a good image gives the same row either way; skipped rows
    # are NaN and listed (ids, reasons) in the setting's attributes.
    on_bad_image: str = "fail"

    def __post_init__(self) -> None:
        from diffeat.data.registry import DATASETS
        from diffeat.models.noise import check_timestep
        from diffeat.store.location import check_location

        self._set("store", check_location(self.store))
        check_choice(self.dataset, DATASETS, "--dataset", error=DatasetError)
        for name in ("root", "classes"):
            value = getattr(self, name)
            self._set(name, None if value is None else str(value))
        self._set("blocks", as_ints(self.blocks, "--block"))
        self._set("ts", as_ints(self.ts, "--t"))
        self._set("pools", as_ints(self.pools, "--pool"))
        self._set("splits", as_strs(self.splits))
        if not self.blocks:
            raise DiffeatError("give at least one --block")
        # Whether --t is needed depends on the model (diffusion models: yes; vision backbones: no), which the
        # record does not load: extract.run.check_timesteps decides from the model's config files.
        for t in self.ts:
            check_timestep(t)
        for k in self.pools:
            if k < 1:
                raise DiffeatError(f"--pool {k} is invalid: pool sizes are integers >= 1 (the paper uses 1, 2, 4, 8)")
        self._set("batch_size", check_batch_size(self.batch_size))
        check_choice(self.dtype, COMPUTE_DTYPE_NAMES, "--dtype")
        check_choice(self.on_bad_image, BAD_IMAGE_POLICIES, "--on-bad-image")
        check_choice(self.store_dtype, STORE_DTYPES, "--store-dtype")
        check_at_least(self.noise_draws, 1, "--noise-draws", what="an integer")
        for name, low in (("limit", 1), ("resolution", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if value is not None:
                check_at_least(value, low, f"--{name.replace('_', '-')}", what="an integer")
        if self.resolution is not None and self.resolution > MAX_RESOLUTION:
            raise DiffeatError(f"--resolution {self.resolution} is invalid: at most {MAX_RESOLUTION} px (the input "
                               "of one image alone would take gigabytes)")
        if self.chunk_rows is not None and (self.chunk_rows < 1 or self.chunk_rows & (self.chunk_rows - 1)):
            raise DiffeatError(f"--chunk-rows {self.chunk_rows} is invalid: it must be a power of two >= 1")
        from diffeat.runtime.cluster import check_cluster_options

        check_cluster_options(self.scheduler, self.workers)

    def setting_ts(self) -> tuple[int | None, ...]:
        """The t of each setting: ``ts``, or ``(None,)`` for a model without a timestep (no ``--t`` given)."""
        return self.ts or (None,)

    def for_workers(self) -> ExtractConfig:
        """The record as a process on another machine must read it: local paths made absolute."""
        from diffeat.store.location import absolute

        return self.replace(store=absolute(self.store), root=absolute(self.root) if self.root else None,
                            classes=absolute(self.classes) if self.classes else None)


def check_batch_size(batch_size: int | str) -> int | str:
    """``batch_size`` if it is an integer >= 1 or ``"auto"``, else a ``DiffeatError`` naming --batch-size."""
    if batch_size == "auto":
        return batch_size
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        return int(batch_size)
    raise DiffeatError(f"--batch-size {batch_size!r} is invalid: it must be an integer >= 1 or 'auto' "
                       "(the largest batch that fits GPU memory; a fixed size on CPU)")
