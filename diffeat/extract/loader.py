"""Noised image batches: decoding, preprocessing and noising run in DataLoader workers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffeat.data.images import preprocess
from diffeat.errors import DatasetError
from diffeat.models.noise import q_sample, sample_noise


class NoisedImages(Dataset):
    """Rows of a sample table, each as x_t for every requested t and noise draw.

    Item ``i`` is ``(row, x)`` with ``x`` of shape (len(ts) * draws, 3, R, R),
    ordered t-major. Noise is seeded per (seed, sample id, t, draw), so the value
    of a row never depends on which batch or worker produced it.

    An image that cannot be decoded gives ``(-1 - row, zeros)`` instead of an exception:
    raised in a loader worker, it would reach the user wrapped in the worker's traceback;
    the loop turns the marker into one line naming the file, or a skipped row
    (:func:`bad_images`).
    """

    def __init__(self, table, rows: np.ndarray, resolution: int, ts: Sequence[int], seed: int, draws: int = 1):
        self.table, self.rows, self.resolution = table, np.asarray(rows, dtype=np.int64), resolution
        self.ts, self.seed, self.draws = list(ts), seed, draws

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        row = int(self.rows[i])
        try:
            image = self.table.load_image(row)
        except DatasetError:
            return -1 - row, torch.zeros(len(self.ts) * self.draws, 3, self.resolution, self.resolution)
        x0 = torch.from_numpy(preprocess(image, self.resolution))
        sample_id = self.table.ids[row]
        xs = [q_sample(x0, sample_noise(sample_id, t, tuple(x0.shape), seed=self.seed, draw=d), t)
              for t in self.ts for d in range(self.draws)]
        return row, torch.stack(xs)


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


def make_loader(dataset: NoisedImages, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
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
