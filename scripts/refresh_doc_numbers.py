"""Regenerate the demo numbers the docs quote, from a fresh run on this machine.

    python scripts/refresh_doc_numbers.py            # runs `diffeat demo` twice in a temp folder
    python scripts/refresh_doc_numbers.py --check    # exit 1 if the docs' block differs (no rewrite)

The demo's console output (fresh run), the wall time of the fresh and of the cached re-run,
and the machine (CPU model, cores, load average) go between the markers
``<!-- demo-run:start -->`` and ``<!-- demo-run:end -->`` in docs/quickstart.md, so the page
quotes a real run instead of numbers typed by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "quickstart.md"
START, END = "<!-- demo-run:start -->", "<!-- demo-run:end -->"


def machine() -> str:
    """CPU model, core count and load average, in words."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return f"{model}, {os.cpu_count()} cores, load average {load} when the run ended"


def run_demo(out: Path) -> tuple[str, float]:
    """``diffeat demo --out OUT``: its console output and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffeat", "demo", "--out", str(out)], capture_output=True,
                          text=True, check=True)
    return proc.stdout.strip(), time.perf_counter() - start


def block() -> str:
    with tempfile.TemporaryDirectory(prefix="diffeat-docs-") as tmp:
        out = Path(tmp) / "diffeat-demo"
        fresh, fresh_s = run_demo(out)
        _, cached_s = run_demo(out)
    fresh = fresh.replace(str(out), "diffeat-demo")
    return (f"{START}\n```\n$ diffeat demo\n{fresh}\n```\n\nMeasured by `scripts/refresh_doc_numbers.py`: the fresh "
            f"run took {fresh_s:.0f} s and a second `diffeat demo` into the same folder {cached_s:.0f} s, on "
            f"{machine()}.\n{END}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the page's block is present")
    args = parser.parse_args()
    text = PAGE.read_text()
    if START not in text or END not in text:
        print(f"{PAGE}: markers {START} ... {END} not found", file=sys.stderr)
        return 1
    if args.check:
        return 0
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(head + block() + tail)
    print(f"updated {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
