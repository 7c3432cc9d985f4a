"""Extraction as tasks over row ranges, claimed unit by unit: one loop for one process,
many processes on one store, and dask workers.

A *task* is a range of rows aligned to the largest unit among the settings being
written; every setting's unit size is a power of two, so each task holds whole units of
every setting, and one forward over its rows serves all of them. Before computing a
task a writer claims the task's pending units (``diffeat.store.claims``) and computes
only the rows of the units it won; units another live writer holds are left to it and
waited for at the end.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffeat.extract.forward import run_forward
from diffeat.extract.work import SplitWork
from diffeat.runtime.progress import Progress
from diffeat.store.claims import Renewer
from diffeat.store.writer import SettingWriter

if TYPE_CHECKING:
    from diffeat.extract.results import ExtractReport

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often to look again at units other writers hold


def plan_tasks(writers: dict[tuple[int, int, int], SettingWriter], n: int, min_rows: int = 1) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) holding whole units of every writer, for the ranges with pending units.

    A range is a multiple of the largest unit (every unit size is a power of two, so it
    holds whole units of every setting), and at least ``min_rows`` long when the data allow.
    """
    if not writers:
        return []
    largest = max(w.plan.unit_rows for w in writers.values())
    step = largest * max(1, -(-min_rows // largest))
    ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    return [(lo, hi) for lo, hi in ranges if any(w.units_in(lo, hi) for w in writers.values())]


@contextlib.contextmanager
def one_cpu_thread(dev: torch.device) -> Iterator[None]:
    """On a CPU, run the forward with one intra-op thread.

    CPU kernels sum in an order that depends on the thread count (measured: 2 threads vs
    1 differ by 5e-4 at block 7 of the tiny model in float16), so features would depend
    on the machine and on how many processes share it. One thread per forward makes a
    store bitwise the same however it was computed: one process, several, or a dask
    cluster. Parallelism on a CPU comes from loader and dask worker processes instead.
    """
    if getattr(dev, "type", "cpu") != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_task(work: SplitWork, lo: int, hi: int, report: ExtractReport, currents: dict | None = None) -> int:
    """Claim the free units of rows [lo, hi) in every setting, compute and write them.

    Returns the number of units this call wrote. ``currents``: claim listings per
    writer key, taken once per round to save requests (a stale listing is safe: the
    exclusive create decides).
    """
    won: dict[tuple[int, int, int], SettingWriter] = {}
    parts = []
    for key, w in work.writers.items():
        units = w.units_in(lo, hi)
        got = w.claim(units, (currents or {}).get(key)) if units else []
        if got:
            won[key] = w
            parts += [np.arange(*w.plan.unit_range(u)) for u in got]
    if not won:
        return 0
    rows = np.unique(np.concatenate(parts))
    before = sum(w.written for w in won.values())
    try:
        with one_cpu_thread(work.dev):
            run_forward(work, rows, won, report, bar=work.bar)
    finally:
        for w in won.values():
            w.abandon()  # after an error, others (or a rerun) may take these units at once
    return sum(w.written for w in won.values()) - before


def run_all(work: SplitWork, report: ExtractReport, *, wait: bool = True) -> int:
    """Compute every pending unit this writer can claim; with ``wait``, also wait for (or take
    over, once expired) the units other writers hold, until every unit is written.

    Returns the number of units this process wrote.
    """
    n = len(work.tab)
    written = 0
    last_log = 0.0
    pending = work.pending()
    if not pending:
        return 0
    rows = len(np.unique(np.concatenate([np.arange(*w.plan.unit_range(u)) for w in pending.values()
                                         for u in w.pending])))
    work.bar = Progress(rows, f"extract {work.tab.dataset}/{work.tab.split}", enabled=work.progress)
    with Renewer([w.claims for w in pending.values()]), contextlib.closing(work.bar):
        while pending:
            currents = {k: w.claims.current() for k, w in pending.items()}
            done_now = 0
            for lo, hi in plan_tasks(pending, n, work.task_rows):
                done_now += run_task(work, lo, hi, report, currents)
            written += done_now
            for w in pending.values():
                w.refresh()
            pending = work.pending()
            if not pending or not wait:
                break
            if done_now == 0:
                if time.monotonic() - last_log > 30:
                    _log_waiting(pending)
                    last_log = time.monotonic()
                time.sleep(POLL_SECONDS)
    return written


def _log_waiting(pending: dict[tuple[int, int, int], SettingWriter]) -> None:
    holders: dict[str, int] = {}
    for w in pending.values():
        current = w.claims.current()
        for u in w.pending:
            c = current.get(str(u))
            who = c.describe() if c is not None and c.owner else "nobody (about to be claimed)"
            holders[who] = holders.get(who, 0) + 1
    logger.info("waiting for units other writers hold: %s",
                ", ".join(f"{n} by {who}" for who, n in sorted(holders.items())))
