"""Probe benchmark: the one-pass linear SGD grid against scikit-learn L-BFGS on the same cached features.

Data: a Gaussian mixture shaped like few-shot diffusion features (probe_cka.md §4.2):
200 classes with means in a rank-128 subspace, isotropic noise, then a random
per-feature scale exp(N(0, 1)) and offset N(0, 2²) as raw activations have;
N_train = 10 000 (50 per class), N_test = 5 000, D = 4096 stored as 1024×2×2
(block 24 at pool 2 of ADM-256). The features are written into a real store
(float16, as extract writes them) and probed through ``diffeat.probe.probe``.

Usage::

    python benchmarks/bench_probe.py [--work DIR] [--n-per-class 50] [--dim 1024] [--classes 200]
                                     [--heads linear,logistic] [--epochs 30] [--threads N] [--stream]

Prints one line per head (test/val top-1, chosen hyperparameters, seconds) and the
machine it ran on. Nothing is timed as a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, n_per_class: int, n_test_per_class: int, classes: int, channels: int, pool: int,
               seed: int = 0, sep: float = 0.5) -> None:
    """Write the mixture as imported features ``mix`` of dataset ``bench`` (train and test splits)."""
    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.imports import import_features
    from diffeat.store.writer import write_sample_table

    rng = np.random.default_rng(seed)
    d = channels * pool * pool
    rank = min(128, d)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    means = (rng.standard_normal((classes, rank)) @ basis.T * sep).astype(np.float32)
    scale = np.exp(rng.standard_normal(d)).astype(np.float32)
    offset = rng.normal(0.0, 2.0, d).astype(np.float32)
    fs = open_store(str(path), mode="a")
    names = [f"class{c:03d}" for c in range(classes)]
    for split, per_class in (("train", n_per_class), ("test", n_test_per_class)):
        y = np.repeat(np.arange(classes), per_class)
        x = means[y] + rng.standard_normal((len(y), d), dtype=np.float32)
        x = (x * scale + offset).reshape(len(y), channels, pool, pool)
        ids = tuple(f"{split}{i}" for i in range(len(y)))
        write_sample_table(fs, SampleTable("bench", split, None, ids, ("",) * len(ids), y, tuple(names)))
        import_features(fs, "bench", split, "mix", x, store_dtype="float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/diffeat_bench_probe")
    parser.add_argument("--n-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1024, help="channels C (features are C×2×2)")
    parser.add_argument("--heads", default="linear,logistic")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", default=None, help="comma-separated learning rates (default: the head's grid)")
    parser.add_argument("--wd", default=None, help="comma-separated weight decays (default: the head's grid)")
    parser.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default: all cores)")
    parser.add_argument("--stream", action="store_true", help="force streaming from the store (budget 1 byte)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--same-c", action="store_true",
                        help="also train the linear grid at the C logistic regression chose (SGD vs L-BFGS fidelity)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (epochs, grid, timings)")
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    # Idle OpenMP threads sleep instead of spinning: on this shared 2-core machine spinning threads
    # slow small steps 20x whenever another process runs (see diffeat/cli/probe.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from threadpoolctl import threadpool_limits

    from diffeat.probe import probe

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(args.work)
    store = work / f"bench_{args.classes}c_{args.n_per_class}pc_{args.dim}.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        make_store(store, args.n_per_class, args.test_per_class, args.classes, args.dim, 2)
        print(f"# wrote {store} in {time.perf_counter() - t0:.1f} s")
    n_train = args.classes * args.n_per_class
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {threads}, "
          f"torch {torch.__version__}, load average at start {os.getloadavg()}")
    print(f"# data: N_train={n_train} (val 10% of it), N_test={args.classes * args.test_per_class}, "
          f"D={args.dim * 4}, classes={args.classes}, store float16, {'streamed' if args.stream else 'in memory'}")

    def floats(text: str | None) -> list[float] | None:
        return [float(v) for v in text.split(",")] if text else None

    print(f"{'head':10s} {'test top1':>9s} {'val top1':>8s} {'grid':>4s} {'seconds':>8s}  chosen")
    chosen_c: dict[str, float | None] = {}
    for head in args.heads.split(","):
        t0 = time.perf_counter()
        with threadpool_limits(threads):
            report = probe(store=str(store), dataset="bench", name="mix", heads=[head], out=str(work / "results"),
                           epochs=args.epochs, lrs=floats(args.lr), wds=floats(args.wd), device=args.device,
                           memory_budget=1 if args.stream else None, save_weights=False)
        wall = time.perf_counter() - t0
        r = report.results[0]
        hp = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.hparams.items()
              if k in ("lr", "wd", "C", "epochs", "k")}
        print(f"{head:10s} {100 * r.test['top1']:9.2f} {100 * r.val['top1']:8.2f} {len(r.grid):4d} {wall:8.1f}  {hp}",
              flush=True)
        chosen_c[head] = r.hparams.get("C")
    if args.same_c and chosen_c.get("logistic") and "linear" in chosen_c:
        # Optimiser fidelity apart from selection noise: the SGD grid at the C logistic regression chose.
        c = chosen_c["logistic"]
        t0 = time.perf_counter()
        with threadpool_limits(threads):
            report = probe(store=str(store), dataset="bench", name="mix", heads=["linear"], out=str(work / "results"),
                           epochs=args.epochs, wds=[1.0 / (c * round(0.9 * n_train))], device=args.device,
                           save_weights=False)
        r = report.results[0]
        print(f"{'linear@C':10s} {100 * r.test['top1']:9.2f} {100 * r.val['top1']:8.2f} {len(r.grid):4d} "
              f"{time.perf_counter() - t0:8.1f}  {{'C': {c:.2g}, 'lr': {r.hparams['lr']:.4g}}} (logistic's C)",
              flush=True)
    print(f"# load average at end {os.getloadavg()}")
    if os.environ.get("DIFFEAT_BENCH_CLEAN"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
