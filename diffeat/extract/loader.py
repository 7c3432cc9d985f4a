"""Image batches for the forward loop: decoding, preprocessing and noise run in DataLoader workers.

Three kinds, by model family:

* pixel-space models (``NoisedImages``): the worker noises the image itself, x_t per t and draw;
* latent models (``ImagesAndNoise``): the worker returns the clean image and the noise, drawn in
  the latent shape; the VAE encodes the batch on the extract device and x_t is formed there;
* vision backbones (``PreprocessedImages``): the image through the model's own preprocessing,
  no noise.

Either way ε is seeded per (seed, sample id, t, draw), so a row's values never depend on which
batch or worker produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffeat.data.images import preprocess
from diffeat.models.noise import sample_noise
from diffeat.models.schedules import ADM_LINEAR

if TYPE_CHECKING:
    from PIL.Image import Image

    from diffeat.data.table import SampleTable
    from diffeat.models.schedules import NoiseSchedule


class NoisedImages(Dataset):
    """Rows of a sample table, each as x_t for every requested t and noise draw.

    Item ``i`` is ``(row, x)`` with ``x`` of shape (len(ts) * draws, 3, R, R),
    ordered t-major. Noise is seeded per (seed, sample id, t, draw), so the value
    of a row never depends on which batch or worker produced it. ``schedule``: the
    model's (ADM's linear one by default; bitwise ``noise.q_sample``).
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, resolution: int, ts: Sequence[int], seed: int,
                 draws: int = 1, schedule: NoiseSchedule = ADM_LINEAR):
        self.table, self.rows, self.resolution = table, np.asarray(rows, dtype=np.int64), resolution
        self.ts, self.seed, self.draws, self.schedule = list(ts), seed, draws, schedule

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row = int(self.rows[i])
        x0 = torch.from_numpy(preprocess(self.table.load_image(row), self.resolution))
        sample_id = self.table.ids[row]
        xs = [self.schedule.add_noise(x0, sample_noise(sample_id, t, tuple(x0.shape), seed=self.seed, draw=d), t)
              for t in self.ts for d in range(self.draws)]
        return row, torch.stack(xs)


class ImagesAndNoise(Dataset):
    """Rows of a sample table as (row, clean image (3, R, R), ε (len(ts) * draws, *latent_shape)), t-major.

    For latent models: the image goes through the VAE on the extract device, then is noised
    there with these ε, drawn by the same rule as ``NoisedImages`` in the latent's shape.
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, resolution: int, latent_shape: tuple[int, ...],
                 ts: Sequence[int], seed: int, draws: int = 1):
        self.table, self.rows, self.resolution = table, np.asarray(rows, dtype=np.int64), resolution
        self.latent_shape, self.ts, self.seed, self.draws = tuple(latent_shape), list(ts), seed, draws

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        row = int(self.rows[i])
        x0 = torch.from_numpy(preprocess(self.table.load_image(row), self.resolution))
        sample_id = self.table.ids[row]
        eps = [sample_noise(sample_id, t, self.latent_shape, seed=self.seed, draw=d)
               for t in self.ts for d in range(self.draws)]
        return row, x0, torch.stack(eps)


class PreprocessedImages(Dataset):
    """Rows of a sample table as (row, x (1, 3, R, R)): the image through a model's own ``preprocessing``.

    For models without noise or timestep (vision backbones); the singleton axis stands where
    ``NoisedImages`` has its (t, draw) axis, so the forward loop treats both alike.
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, preprocessing: Callable[[Image], np.ndarray]):
        self.table, self.rows, self.preprocessing = table, np.asarray(rows, dtype=np.int64), preprocessing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row = int(self.rows[i])
        return row, torch.from_numpy(self.preprocessing(self.table.load_image(row)))[None]


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader in row order (writers fill units sequentially), prefetching in workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
