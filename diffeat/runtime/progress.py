"""Progress: a tqdm bar on a terminal, periodic log lines (rate, ETA) otherwise (SLURM, CI, files)."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("diffeat")


class Progress:
    """Counts items; shows a bar on a TTY, else logs every ``every`` seconds.

    Off a terminal a run shorter than ``every`` logs nothing at all, so a sweep of many small
    settings stays quiet; a longer one logs its rate and ETA, then a closing line. ``leave``:
    keep the finished bar on screen (one bar per split), or clear it (one per probed setting).
    """

    def __init__(self, total: int, desc: str, unit: str = "img", every: float = 30.0, enabled: bool | None = None,
                 leave: bool = True):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.count = 0
        self.start = self._last = time.perf_counter()
        self._logged = False
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        if tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)

    def update(self, n: int) -> None:
        """Add ``n`` finished items."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last, self._logged = now, True
            rate = self.count / max(now - self.start, 1e-9)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            logger.info("%s: %d/%d %s, %.1f %s/s, ETA %.0f s", self.desc, self.count, self.total, self.unit,
                        rate, self.unit, eta)

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.count / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        """Finish the bar (or log a last line)."""
        if self._bar is not None:
            self._bar.close()
        elif self._logged:
            logger.info("%s: %d %s in %.1f s (%.1f %s/s)", self.desc, self.count, self.unit,
                        time.perf_counter() - self.start, self.rate, self.unit)
