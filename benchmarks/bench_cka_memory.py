"""Peak memory of ``diffeat cka`` under ``--memory-budget`` on a sharded setting larger than the budget.

    python benchmarks/bench_cka_memory.py [--n 50000] [--d 2048] [--budget 256M] [--work DIR] [--code DIR ...]

A synthetic (N, D) fp16 setting is imported into a store (beside a sample table of N ids); at
these sizes the array is sharded (64 MiB shards of 16,384 rows for D = 2,048), the layout of
issue 16's case (200,000 x 4,096 with a 512 MiB budget peaked at 1.0 GB). Each ``--code`` is a
source tree of diffeat (default: this checkout) run in a fresh process on the same store, side
by side: the child reports its peak RSS (``ru_maxrss``), its RSS after imports, the plan's route
and row block, and the CKA value. Prints a table of figures; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from diffeat.cka import cka_matrix
from diffeat.cka.api import open_specs
from diffeat.cka.settings import SettingSpec
from diffeat.store import open_store

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

(source,) = open_specs(open_store(sys.argv[1]), "synthetic", "test", [SettingSpec.parse("name=random")])
base = rss()
t = time.perf_counter()
result = cka_matrix([source], [source], memory_budget=sys.argv[2])
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "base": base,
                  "route": result.route, "rows": result.plan["rows"], "in_memory": result.plan["in_memory"],
                  "value": result.value, "seconds": time.perf_counter() - t}))
"""


def make_store(work: Path, n: int, d: int) -> Path:
    """The store with the (n, d) fp16 setting, written once (blockwise through a memory-mapped .npy)."""
    import numpy as np

    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.imports import import_features
    from diffeat.store.writer import write_sample_table

    store = work / f"cka-memory-{n}x{d}.zarr"
    if (store / "_catalog").is_dir():
        return store
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"random-{n}x{d}.npy"
    array = np.lib.format.open_memmap(source, mode="w+", dtype=np.float16, shape=(n, d))
    rng = np.random.default_rng(0)
    for lo in range(0, n, 8192):
        array[lo:lo + 8192] = rng.standard_normal((min(8192, n - lo), d), dtype=np.float32)
    array.flush()
    fs = open_store(str(store), mode="a")
    write_sample_table(fs, SampleTable("synthetic", "test", None, tuple(f"s{i}" for i in range(n)), ("",) * n,
                                       np.arange(n) % 10, tuple(map(str, range(10)))))
    import_features(fs, "synthetic", "test", "random", np.load(source, mmap_mode="r"), model="synthetic")
    source.unlink()
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--budget", default="256M")
    parser.add_argument("--work", default="/tmp/diffeat-bench-cka-memory")
    parser.add_argument("--code", action="append", help="diffeat source trees to compare (default: this one)")
    args = parser.parse_args()
    store = make_store(Path(args.work), args.n, args.d)
    rows = []
    for code in args.code or [str(HERE)]:
        env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "2"}
        out = subprocess.run([sys.executable, "-c", CHILD, str(store), args.budget], capture_output=True, text=True,
                             env=env, check=True, cwd=args.work).stdout
        rows.append((code, json.loads(out.strip().splitlines()[-1])))
    from diffeat.runtime.memory import parse_bytes

    budget = parse_bytes(args.budget)
    print(f"CKA of a {args.n} x {args.d} fp16 setting ({args.n * args.d * 4 / 2**30:.2f} GiB as float32) with "
          f"--memory-budget {args.budget}")
    print(f"{'code':40s} {'route':9s} {'rows':>6s} {'peak RSS':>10s} {'after imports':>14s} {'peak - imports':>15s} "
          f"{'/ budget':>9s} {'seconds':>8s}")
    for code, r in rows:
        extra = r["peak"] - r["base"]
        print(f"{code[-40:]:40s} {r['route']:9s} {r['rows']:>6d} {r['peak'] / 2**20:>8.0f} M {r['base'] / 2**20:>12.0f} M "
              f"{extra / 2**20:>13.0f} M {extra / budget:>9.2f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
