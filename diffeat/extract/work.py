"""``SplitWork``: everything one process needs to compute the features of one dataset split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from diffeat.data.table import SampleTable
    from diffeat.extract.config import ExtractConfig
    from diffeat.extract.forward import ForwardCache
    from diffeat.models.families.base import FeatureModel
    from diffeat.runtime.progress import Progress
    from diffeat.store.writer import SettingWriter


@dataclass
class SplitWork:
    """One split's extraction as this process runs it: the options record plus what was resolved from it.

    ``writers`` maps (block, t, pool) to the setting's ``SettingWriter``; ``res`` is the input
    resolution, ``dev`` the torch device and ``num_workers`` the loader processes, all resolved
    from ``config`` (a dask worker, a daemonic process, runs its loader in-process).
    ``forwards`` keeps the prepared (compiled) forward across the tasks of a run.
    """

    config: ExtractConfig
    model: FeatureModel  # the loaded model's family view: denoiser, VAE, conditioning, schedule
    tab: SampleTable
    writers: dict[tuple[int, int, int], SettingWriter]
    res: int
    dev: torch.device
    num_workers: int
    forwards: ForwardCache
    progress: bool | None = None
    bar: Progress | None = field(default=None, repr=False)  # one bar per split, shared by the tasks

    @property
    def task_rows(self) -> int:
        """Rows a task should span at least: each ``run_forward`` call starts its loader again
        (about 70 ms on a CPU, more with many GPU loader workers), so tasks cover several batches."""
        batch = self.config.batch_size
        return 8 * (batch if isinstance(batch, int) else 512)

    def pending(self) -> dict[tuple[int, int, int], SettingWriter]:
        """Writers with units still to write."""
        return {k: w for k, w in self.writers.items() if w.pending}
