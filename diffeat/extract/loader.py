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
from diffeat.errors import DatasetError
from diffeat.models.noise import sample_noise
from diffeat.models.schedules import ADM_LINEAR

if TYPE_CHECKING:
    from PIL.Image import Image

    from diffeat.data.table import SampleTable
    from diffeat.models.schedules import NoiseSchedule


class _TableRows(Dataset):
    """Rows of a sample table, one item each; ``_image(row)`` is None for an image that cannot be decoded.

    Returning a marker (``-1 - row``) instead of raising keeps a bad image's error out of the
    loader worker's traceback: the forward loop turns it into one line naming the file, or a
    skipped row (:func:`bad_images`).
    """

    def __init__(self, table: SampleTable, rows: np.ndarray):
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, row: int) -> Image | None:
        try:
            return self.table.load_image(row)
        except DatasetError:
            return None


class NoisedImages(_TableRows):
    """Rows of a sample table, each as x_t for every requested t and noise draw.

    Item ``i`` is ``(row, x)`` with ``x`` of shape (len(ts) * draws, 3, R, R),
    ordered t-major. Noise is seeded per (seed, sample id, t, draw), so the value
    of a row never depends on which batch or worker produced it. ``schedule``: the
    model's (ADM's linear one by default; bitwise ``noise.q_sample``).

    An image that cannot be decoded gives ``(-1 - row, zeros)`` instead of an exception:
    raised in a loader worker, it would reach the user wrapped in the worker's traceback;
    the loop turns the marker into one line naming the file, or a skipped row
    (:func:`bad_images`).
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, resolution: int, ts: Sequence[int], seed: int,
                 draws: int = 1, schedule: NoiseSchedule = ADM_LINEAR):
        super().__init__(table, rows)
        self.resolution, self.ts, self.seed, self.draws, self.schedule = resolution, list(ts), seed, draws, schedule

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row = int(self.rows[i])
        image = self._image(row)
        if image is None:
            return -1 - row, torch.zeros(len(self.ts) * self.draws, 3, self.resolution, self.resolution)
        x0 = torch.from_numpy(preprocess(image, self.resolution))
        sample_id = self.table.ids[row]
        xs = [self.schedule.add_noise(x0, sample_noise(sample_id, t, tuple(x0.shape), seed=self.seed, draw=d), t)
              for t in self.ts for d in range(self.draws)]
        return row, torch.stack(xs)


class ImagesAndNoise(_TableRows):
    """Rows of a sample table as (row, clean image (3, R, R), ε (len(ts) * draws, *latent_shape)), t-major.

    For latent models: the image goes through the VAE on the extract device, then is noised
    there with these ε, drawn by the same rule as ``NoisedImages`` in the latent's shape. An
    image that cannot be decoded gives ``-1 - row`` and a zero image, as ``NoisedImages`` does.
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, resolution: int, latent_shape: tuple[int, ...],
                 ts: Sequence[int], seed: int, draws: int = 1):
        super().__init__(table, rows)
        self.resolution, self.latent_shape = resolution, tuple(latent_shape)
        self.ts, self.seed, self.draws = list(ts), seed, draws

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        row = int(self.rows[i])
        sample_id = self.table.ids[row]
        eps = [sample_noise(sample_id, t, self.latent_shape, seed=self.seed, draw=d)
               for t in self.ts for d in range(self.draws)]
        image = self._image(row)
        if image is None:
            return -1 - row, torch.zeros(3, self.resolution, self.resolution), torch.stack(eps)
        x0 = torch.from_numpy(preprocess(image, self.resolution))
        return row, x0, torch.stack(eps)


class PreprocessedImages(_TableRows):
    """Rows of a sample table as (row, x (1, 3, R, R)): the image through a model's own ``preprocessing``.

    For models without noise or timestep (vision backbones); the singleton axis stands where
    ``NoisedImages`` has its (t, draw) axis, so the forward loop treats both alike. An image that
    cannot be decoded gives ``-1 - row`` and a blank image's input, as ``NoisedImages`` does.
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, preprocessing: Callable[[Image], np.ndarray]):
        super().__init__(table, rows)
        self.preprocessing = preprocessing

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row = int(self.rows[i])
        image = self._image(row)
        if image is None:
            from PIL import Image as PILImage

            blank = self.preprocessing(PILImage.new("RGB", (64, 64)))  # the input's shape, whatever the model's
            return -1 - row, torch.zeros(blank.shape, dtype=torch.from_numpy(blank).dtype)[None]
        return row, torch.from_numpy(self.preprocessing(image))[None]


def bad_images(table, rows: np.ndarray, policy: str) -> dict[int, dict]:
    """``{row: {"id", "reason"}}`` for rows whose image could not be decoded; with ``policy="fail"``,
    the :class:`DatasetError` of the first, naming its file (decoded again here, in this process)."""
    out = {}
    for row in (int(r) for r in rows):
        try:
            table.load_image(row)
            reason = f"image of {table.ids[row]} could not be decoded in a loader worker"  # flaky storage?
        except DatasetError as e:
            reason = str(e)
        if policy == "fail":
            raise DatasetError(f"{reason} (--on-bad-image skip stores its row as NaN and goes on; finished units "
                               "are kept)")
        out[row] = {"id": table.ids[row], "reason": reason}
    return out


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
