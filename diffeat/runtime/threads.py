"""CPU threads for a compute command (``--threads``): one default that does not oversubscribe.

Measured on the shared 2-core box with other jobs running: a digits probe took 30–40 s with
2 torch threads against 2.3–3.2 s with 1 (spinning OpenMP threads fight the other jobs for
the cores). So the default leaves a core free for the read-ahead thread, loader processes and
whatever shares the machine, and a dask worker process (one task per worker thread) uses 1.
The CLI also sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (``diffeat.cli.main``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """One less than the usable CPUs (at least 1); 1 inside a dask worker or another daemonic process."""
    if multiprocessing.current_process().daemon:
        return 1
    return max(1, usable_cpus() - 1)


@contextlib.contextmanager
def compute_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` CPU threads (None: ``default_threads()``) in torch and in BLAS.

    torch's intra-op pool and the BLAS behind numpy/scipy (OpenBLAS, MKL, via threadpoolctl)
    are both limited, and both restored afterwards.
    """
    import torch
    from threadpoolctl import threadpool_limits

    n = default_threads() if threads is None else int(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield n
    finally:
        torch.set_num_threads(before)
