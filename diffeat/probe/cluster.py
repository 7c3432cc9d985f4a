"""The probe's statistics pass on a dask cluster (``diffeat probe --scheduler/--workers``).

Training stays in the probe's process: every batch feeds every head of the grid, and
splitting that over machines would change what is trained. What a cluster can take is
the one streaming pass over a training split that does not fit in memory: the float64
per-feature moments (standardisation statistics) of the fit and validation rows. Workers
open the split's array themselves, read-only (an :class:`~diffeat.store.refs.ArrayRef`,
as CKA's workers do), each computes the moments of its chunk-aligned blocks, and the
client merges them in row order: the blocks and merge order of the single-process pass,
so the moments are the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from diffeat.probe.data import StreamedRows
from diffeat.store.refs import ArrayRef, open_array, read_on_worker
from diffeat.store.streaming import RunningMoments

if TYPE_CHECKING:
    from distributed import Client

    from diffeat.store.reader import FeatureSet

logger = logging.getLogger(__name__)


def block_moments_task(ref: ArrayRef, ranges: Sequence[tuple[int, int]], fit: Sequence[np.ndarray],
                       val: Sequence[np.ndarray]) -> list[tuple[RunningMoments, RunningMoments]]:
    """Worker side: ``(fit, val)`` moments of each block; ``fit[i]``/``val[i]`` are row offsets in block ``i``."""
    array = open_array(ref)
    out = []
    for (lo, hi), f, v in zip(ranges, fit, val, strict=True):
        block = read_on_worker(array, ref, lo, hi, np.float32, wanted=np.concatenate([f, v]))
        out.append((RunningMoments.of(block[f]), RunningMoments.of(block[v])))
    return out


def cluster_moments(client: Client, features: FeatureSet, source: StreamedRows, fit_rows: np.ndarray,
                    val_rows: np.ndarray, blocks_per_task: int = 4) -> tuple[RunningMoments, RunningMoments]:
    """``diffeat.probe.data.moments`` computed on the cluster, for a split streamed from the store."""
    ref = features.ref()
    fit_acc = RunningMoments.empty(source.feature_shape)
    val_acc = RunningMoments.empty(source.feature_shape)
    ranges = list(source.ranges)
    futures = []
    for i in range(0, len(ranges), blocks_per_task):
        part = ranges[i:i + blocks_per_task]
        fit = [fit_rows[(fit_rows >= lo) & (fit_rows < hi)] - lo for lo, hi in part]
        val = [val_rows[(val_rows >= lo) & (val_rows < hi)] - lo for lo, hi in part]
        futures.append(client.submit(block_moments_task, ref, part, fit, val, pure=False))
    for future in futures:  # in row order: the single-process merge order
        for f, v in future.result():
            fit_acc.merge(f)
            val_acc.merge(v)
    logger.info("%s: statistics pass on the cluster (%d tasks)", features.info.label(), len(futures))
    return fit_acc, val_acc
