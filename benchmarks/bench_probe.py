"""Probe benchmark: the linear probe (L-BFGS, the default, or the paper's SGD grid) against scikit-learn.

Data: a Gaussian mixture shaped like few-shot diffusion features (probe_cka.md §4.2):
200 classes with means in a rank-128 subspace, isotropic noise, then a random
per-feature scale exp(N(0, 1)) and offset N(0, 2²) as raw activations have;
N_train = 10 000 (50 per class), N_test = 5 000, D = 4096 stored as 1024×2×2
(block 24 at pool 2 of ADM-256). The features are written into a real store
(float16, as extract writes them) and probed through ``diffeat.probe.probe``.

Side by side, in one run: each head of ``--heads`` (``linear`` is the default recipe, L-BFGS;
``linear:paper`` the SGD grid; ``logistic`` is scikit-learn's ``LogisticRegression`` tuned on
the same validation split) runs ``--rounds`` times, the heads' order alternating from round to
round; the summary gives median wall and CPU seconds, test top-1 and the ratios against
``logistic``.

``--scale``: N_train 200 000 × D 4 096 (1.6 GB as float16) and 100 classes, probed with
``--memory-budget 1G`` (the split is streamed from the store), in a child process whose peak
resident memory (``VmHWM``) is reported next to its memory after imports.

Usage::

    python benchmarks/bench_probe.py [--work DIR] [--classes 200] [--n-per-class 50] [--dim 1024]
                                     [--heads linear,logistic] [--rounds 1] [--threads N] [--stream]
    python benchmarks/bench_probe.py --scale [--scale-rows 200000] [--scale-classes 100] [--budget 1G]

Prints the figures and the machine; nothing is timed as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def mixture(classes: int, d: int, seed: int = 0, sep: float = 0.5):
    """``draw(y) -> float32 (len(y), d)`` rows of the mixture (class means in a rank-128 subspace, raw scales)."""
    rng = np.random.default_rng(seed)
    rank = min(128, d)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    means = (rng.standard_normal((classes, rank)) @ basis.T * sep).astype(np.float32)
    scale = np.exp(rng.standard_normal(d)).astype(np.float32)
    offset = rng.normal(0.0, 2.0, d).astype(np.float32)

    def draw(y: np.ndarray) -> np.ndarray:
        return (means[y] + rng.standard_normal((len(y), d), dtype=np.float32)) * scale + offset

    return draw


def make_store(path: Path, n_per_class: int, n_test_per_class: int, classes: int, channels: int, pool: int,
               seed: int = 0, block: int = 8192) -> None:
    """Write the mixture as imported features ``mix`` of dataset ``bench`` (train and test splits).

    Rows are drawn ``block`` at a time into a float16 ``.npy`` on disk and imported from it, so
    a 1.6 GB split never sits in this process's memory.
    """
    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.imports import import_features
    from diffeat.store.writer import write_sample_table

    d = channels * pool * pool
    draw = mixture(classes, d, seed)
    fs = open_store(str(path), mode="a")
    names = [f"class{c:03d}" for c in range(classes)]
    for split, per_class in (("train", n_per_class), ("test", n_test_per_class)):
        y = np.tile(np.arange(classes), per_class)  # classes interleaved: every block holds all of them
        x = np.lib.format.open_memmap(path.parent / f"{path.name}.{split}.npy", mode="w+", dtype=np.float16,
                                      shape=(len(y), channels, pool, pool))
        for lo in range(0, len(y), block):
            x[lo:lo + block] = draw(y[lo:lo + block]).reshape(-1, channels, pool, pool)
        x.flush()
        ids = tuple(f"{split}{i}" for i in range(len(y)))
        write_sample_table(fs, SampleTable("bench", split, None, ids, ("",) * len(ids), y, tuple(names)))
        import_features(fs, "bench", split, "mix", x, store_dtype="float16")
        del x
        (path.parent / f"{path.name}.{split}.npy").unlink()


def run_head(store: Path, work: Path, spec: str, args, budget) -> dict:
    """One probe of head ``spec`` (``head`` or ``head:recipe``): figures as a dict."""
    from diffeat.probe import probe

    head, _, recipe = spec.partition(":")
    options = {"recipe": recipe} if recipe else {}
    if args.cs:
        options["cs"] = [float(v) for v in args.cs.split(",")]
    wall, cpu = time.perf_counter(), time.process_time()
    report = probe(store=str(store), dataset="bench", name="mix", heads=[head], out=str(work / "results"),
                   epochs=args.epochs, device=args.device, memory_budget=budget, save_weights=False, **options)
    r = report.results[0]
    return {"head": spec, "top1": r.test["top1"], "val_top1": r.val["top1"], "grid": len(r.grid),
            "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "chosen": {k: v for k, v in r.hparams.items() if k in ("lr", "wd", "C", "recipe")}}


def rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    ``VmHWM`` of ``/proc/self/status`` where there is one: Linux carries ``ru_maxrss`` across
    ``exec``, so a child started by a parent holding the 2.4 GB it just wrote reported 2.4 GB
    before doing anything. ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """The ``--scale`` probe, in its own process: prints one JSON line with time and peak memory."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    import diffeat.probe.run  # noqa: F401 - every import the probe needs, before the baseline is taken

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    baseline = rss_mib()
    out = run_head(Path(args.child), Path(args.work), args.heads, args, args.budget)
    print(json.dumps({**out, "rss_after_imports_mib": baseline, "peak_rss_mib": rss_mib()}))


def scale(args, work: Path) -> None:
    """Build the 200k-row store (once) and probe it in a child process under the memory budget."""
    store = work / f"scale_{args.scale_classes}c_{args.scale_rows}_{args.dim}.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        make_store(store, args.scale_rows // args.scale_classes, 100, args.scale_classes, args.dim, 2)
        print(f"# wrote {store} in {time.perf_counter() - t0:.1f} s")
    from diffeat.runtime.memory import memory_budget
    from diffeat.store import open_store

    train = open_store(str(store)).open_features(dataset="bench", split="train", name="mix")
    print(f"# scale: N_train={len(train)}, D={args.dim * 4}, classes={args.scale_classes}, float16 "
          f"{train.nbytes / 2**30:.2f} GiB on disk decoded, --memory-budget {args.budget} "
          f"({memory_budget(args.budget) / 2**30:.2f} GiB)")
    cmd = [sys.executable, __file__, "--child", str(store), "--work", str(work), "--heads", args.scale_head,
           "--budget", args.budget, "--device", args.device, "--epochs", str(args.epochs)]
    cmd += ["--cs", args.cs] if args.cs else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["-v"] if args.verbose else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    if args.verbose:
        sys.stderr.write(done.stderr)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print("| head | test top1 | chosen | wall s | CPU s | RSS after imports | peak RSS | budget |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    print(f"| {r['head']} | {100 * r['top1']:.2f} | {r['chosen']} | {r['wall']:.0f} | {r['cpu']:.0f} | "
          f"{r['rss_after_imports_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB | "
          f"{memory_budget(args.budget) / 2**20:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/diffeat_bench_probe")
    parser.add_argument("--n-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1024, help="channels C (features are C×2×2)")
    parser.add_argument("--heads", default="linear,logistic",
                        help="comma-separated heads, head:recipe for another recipe (linear:paper)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every head, order alternating")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cs", default=None, help="comma-separated C grid (default: the head's)")
    parser.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: all cores)")
    parser.add_argument("--stream", action="store_true", help="force streaming from the store (budget 1 byte)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", action="store_true", help="the 200k x 4096 case under --budget")
    parser.add_argument("--scale-rows", type=int, default=200_000)
    parser.add_argument("--scale-classes", type=int, default=100)
    parser.add_argument("--budget", default="1G", help="--memory-budget of the --scale case")
    parser.add_argument("--scale-head", default="linear", help="the head (head:recipe) of the --scale case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (epochs, grid, timings)")
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.child:
        child(args)
        return

    # Idle OpenMP threads sleep instead of spinning: on this shared 2-core machine spinning threads
    # slow small steps 20x whenever another process runs (see diffeat/cli/probe.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from threadpoolctl import threadpool_limits

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {threads}, "
          f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.2f}")
    if args.scale:
        scale(args, work)
        return
    store = work / f"bench_{args.classes}c_{args.n_per_class}pc_{args.dim}.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        make_store(store, args.n_per_class, args.test_per_class, args.classes, args.dim, 2)
        print(f"# wrote {store} in {time.perf_counter() - t0:.1f} s")
    n_train = args.classes * args.n_per_class
    print(f"# data: N_train={n_train} (val 10% of it), N_test={args.classes * args.test_per_class}, "
          f"D={args.dim * 4}, classes={args.classes}, store float16, {'streamed' if args.stream else 'in memory'}")
    specs = args.heads.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    print(f"{'head':14s} {'test top1':>9s} {'val top1':>8s} {'grid':>4s} {'wall s':>7s} {'CPU s':>7s}  chosen")
    for r in range(args.rounds):
        for spec in (specs if r % 2 == 0 else specs[::-1]):
            with threadpool_limits(threads):
                out = run_head(store, work, spec, args, 1 if args.stream else None)
            runs[spec].append(out)
            print(f"{spec:14s} {100 * out['top1']:9.2f} {100 * out['val_top1']:8.2f} {out['grid']:4d} "
                  f"{out['wall']:7.1f} {out['cpu']:7.1f}  {out['chosen']}", flush=True)
    if "logistic" in runs and len(specs) > 1:
        ref = runs["logistic"]
        ref_wall = statistics.median(o["wall"] for o in ref)
        ref_cpu = statistics.median(o["cpu"] for o in ref)
        print("\n| head | test top-1 % | vs scikit-learn (points) | wall s | CPU s | scikit-learn wall / this | "
              "scikit-learn CPU / this |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for spec, outs in runs.items():
            wall = statistics.median(o["wall"] for o in outs)
            cpu = statistics.median(o["cpu"] for o in outs)
            top1 = statistics.median(o["top1"] for o in outs)
            print(f"| {spec} | {100 * top1:.2f} | {100 * (top1 - ref[0]['top1']):+.2f} | {wall:.1f} | {cpu:.1f} | "
                  f"{ref_wall / wall:.1f}× | {ref_cpu / cpu:.1f}× |")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    if os.environ.get("DIFFEAT_BENCH_CLEAN"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
