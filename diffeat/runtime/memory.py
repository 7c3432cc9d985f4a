"""Memory budgets: one parser (``--memory-budget 8G``) and one default for every command.

Probe and CKA decide from the budget whether a setting is loaded whole or streamed from the
store, and how large their row blocks are. Sizes are binary (``G`` = 2**30).
"""

from __future__ import annotations

import re
import resource

from diffeat.errors import DiffeatError

#: The share of available memory a command uses when no budget is given.
DEFAULT_SHARE = 0.6

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# Under RLIMIT_AS, thread stacks, malloc arenas and BLAS buffers reserve address space that is
# never touched: measured ~250 MiB of VmSize growth during a streamed CKA run (zarr's threads, the
# read-ahead thread, OpenBLAS), against ~150 MiB resident.
AS_RESERVE = 384 << 20


def parse_bytes(value: str | int, option: str = "--memory-budget") -> int:
    """``"8G"``, ``"512MiB"``, ``"2.5GB"``, ``"4096"`` or an int: a positive number of bytes (binary units)."""
    if isinstance(value, bool):
        raise DiffeatError(f"{option} {value!r} is not a size: use e.g. 512M, 8G or a number of bytes")
    if isinstance(value, int):
        number = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)(?:i?b)?\s*", str(value).lower())
        if not m:
            raise DiffeatError(f"{option} {value!r} is not a size: use e.g. 512M, 8G or a number of bytes")
        number = int(float(m.group(1)) * _UNITS[m.group(2)])
    if number <= 0:
        raise DiffeatError(f"{option} {value!r} is invalid: the budget must be positive")
    return number


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _address_space_headroom() -> int | None:
    """Bytes left under RLIMIT_AS (``ulimit -v``) after the reserve, if a limit is set."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        vm = 0
    return max(0, soft - vm - AS_RESERVE)


def available_memory() -> int:
    """Memory this process may still use: MemAvailable, capped by an address-space limit (4 GiB if unknown)."""
    limits = [v for v in (_meminfo_available(), _address_space_headroom()) if v is not None]
    return min(limits) if limits else 4 << 30


def memory_budget(value: str | int | None, option: str = "--memory-budget") -> int:
    """The budget in bytes: ``value`` parsed, or ``DEFAULT_SHARE`` of the memory available now."""
    if value is None:
        return int(DEFAULT_SHARE * available_memory())
    return parse_bytes(value, option)


def fmt_bytes(n: float) -> str:
    """``1.5 GiB``, ``340 KiB``: sizes in messages."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
