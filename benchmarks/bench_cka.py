"""Benchmark ``diffeat cka``: all-pairs CKA over 37 settings, and an out-of-core case under a memory cap.

    python benchmarks/bench_cka.py [--n 10000] [--work /tmp/diffeat-bench-cka] [--skip-matrix] [--skip-ooc]

1. **All pairs, 37 settings, N = 10k.** A store shaped like ADM-256 at pool 1: block b has
   the channel count of block b of the 256×256 ADM U-Net (256…1024; ΣD = 21,760), fp16,
   written with the store's own writer. Synthetic features with an encoder/decoder "X"
   structure (block b mixes two latent factors at an angle that grows with |b − 19|) plus
   ReLU and large per-feature offsets. Routes: auto (float64), Gram float32, feature space
   float64, minibatch (b = 512, 1 pass). Each run is a fresh process: wall time and peak RSS.
2. **Out of core.** 4 settings × N = 50k × D = 1024 (fp16 on disk 0.4 GB; 0.8 GB as float32,
   1.6 GB as float64). The child caps its own address space (RLIMIT_AS, i.e. ``ulimit -v``)
   at what it uses after imports plus ``--cap-extra`` MiB, checks that loading the features
   fails under that cap, then runs CKA (auto route: streaming feature space; and minibatch)
   and compares with an uncapped in-memory run.

Prints a table of figures; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Channels of ADM-256 blocks 1..37 (diffeat.models.blocks.block_table of the adm256 architecture).
ADM256_CHANNELS = [256] * 7 + [512] * 6 + [1024] * 12 + [512] * 6 + [256] * 6
MODEL, DATASET, SPLIT, T = "synthetic-adm256", "synthetic", "test", 90


def vm_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


# ------------------------------------------------------------------------------------------- store
def build_store(path: Path, n: int, channels: list[int], seed: int = 0) -> None:
    """Write a store with one setting per block (block b, t=90, pool 1) through the store's writer."""
    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.layout import setting_name, setting_path, settings_hash
    from diffeat.store.writer import SettingWriter, write_sample_table

    fs = open_store(str(path), mode="a")
    table = SampleTable(DATASET, SPLIT, None, tuple(f"s{i:07d}" for i in range(n)), ("",) * n,
                        np.zeros(n, dtype=np.int64), ("all",))
    write_sample_table(fs, table)
    manifest = table.manifest_sha256()
    rng = np.random.default_rng(seed)
    z1, z2 = rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    count = len(channels)
    middle = (count + 1) / 2
    for b, c in enumerate(channels, start=1):
        settings = {"synthetic": True, "block": b, "t": T, "pool": 1, "n": n, "seed": seed, "channels": c}
        digest = settings_hash(settings)
        spath = setting_path(MODEL, DATASET, SPLIT, setting_name(b, T, 1, digest))
        attrs = {"settings": settings, "settings_hash": digest, "manifest_sha256": manifest,
                 "setting": {"model": MODEL, "dataset": DATASET, "split": SPLIT, "block": b, "t": T, "pool": 1,
                             "name": None}}
        w = SettingWriter.open(fs, spath, (n, c, 1, 1), "float16", attrs, label=f"block {b}")
        if w.pending:
            angle = np.pi / 2 * abs(b - middle) / (middle - 1)
            z = np.cos(angle) * z1 + np.sin(angle) * z2
            brng = np.random.default_rng(seed + b)
            proj = brng.normal(size=(32, c)) / np.sqrt(32)
            offset = brng.uniform(2, 6, size=c)  # post-activation features: large positive means
            for u in sorted(w.pending):
                lo, hi = w.plan.unit_range(u)
                x = np.maximum(z[lo:hi] @ proj + 0.8 * brng.normal(size=(hi - lo, c)), 0) + offset
                w.add(np.arange(lo, hi), x.reshape(hi - lo, c, 1, 1).astype(np.float32))
        assert w.publish()


# ------------------------------------------------------------------------------------------- child
def child(args: argparse.Namespace) -> None:
    """One measured run in a fresh process; prints one JSON line."""
    from diffeat.cka.settings import SettingSpec, store_cka
    from diffeat.store import open_store

    if args.cap_extra:
        cap = vm_bytes("VmSize") + args.cap_extra * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out: dict = {"case": args.case, "cap_bytes": cap if args.cap_extra else None}
    specs = [SettingSpec(b, T, 1) for b in range(1, args.settings + 1)]
    if args.try_load:
        fs = open_store(args.store)
        try:
            held = [fs.open_features(dataset=DATASET, split=SPLIT, block=s.block, t=T, pool=1).load(np.float64)
                    for s in specs]
            out["load_all"] = f"loaded {sum(h.nbytes for h in held) / 2**30:.2f} GiB"
            del held
        except MemoryError:
            out["load_all"] = "MemoryError"
    options = json.loads(args.options)
    start = time.perf_counter()
    result = store_cka(args.store, DATASET, SPLIT, specs, **options)
    out.update(seconds=round(time.perf_counter() - start, 2), route=result.route, plan=result.plan,
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               vm_peak_mib=round(vm_bytes("VmPeak") / 2**20, 1))
    np.save(args.save, result.matrix)
    print(json.dumps(out))


def run_child(store: Path, case: str, settings: int, options: dict, save: Path, cap_extra: int = 0,
              try_load: bool = False) -> dict:
    cmd = [sys.executable, __file__, "child", "--store", str(store), "--case", case, "--settings", str(settings),
           "--options", json.dumps(options), "--save", str(save), "--cap-extra", str(cap_extra)]
    if try_load:
        cmd.append("--try-load")
    # One malloc arena per thread reserves 64 MiB of address space each: keep RLIMIT_AS about real memory.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows: list[dict], ref: np.ndarray | None, saves: dict[str, Path]) -> None:
    print(f"{'case':34s} {'route':10s} {'seconds':>8s} {'peak RSS MiB':>13s} {'max |Δ| vs exact':>17s}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:34s} ERROR {r['error']}")
            continue
        diff = ""
        if ref is not None and saves.get(r["case"]) is not None:
            diff = f"{np.nanmax(np.abs(np.load(saves[r['case']]) - ref)):.2e}"
        notes = r.get("load_all", "")
        if r.get("cap_bytes"):
            notes = f"RLIMIT_AS {r['cap_bytes'] / 2**30:.2f} GiB; load-all: {notes}"
        print(f"{r['case']:34s} {r['route']:10s} {r['seconds']:8.1f} {r['peak_rss_mib']:13.0f} {diff:>17s}  {notes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "child"])
    p.add_argument("--work", type=Path, default=Path("/tmp/diffeat-bench-cka"))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--ooc-n", type=int, default=50_000)
    p.add_argument("--cap-extra", type=int, default=0, help="MiB of address space over the post-import size")
    p.add_argument("--skip-matrix", action="store_true")
    p.add_argument("--skip-ooc", action="store_true")
    # child-only
    p.add_argument("--store"), p.add_argument("--case"), p.add_argument("--settings", type=int)
    p.add_argument("--options", default="{}"), p.add_argument("--save"), p.add_argument("--try-load", action="store_true")
    args = p.parse_args()
    if args.mode == "child":
        child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB")

    if not args.skip_matrix:
        store = args.work / f"adm256_n{args.n}.zarr"
        t0 = time.perf_counter()
        build_store(store, args.n, ADM256_CHANNELS)
        print(f"\n[1] all pairs: 37 settings (ADM-256 channels, ΣD={sum(ADM256_CHANNELS)}), N={args.n}, fp16 store "
              f"({time.perf_counter() - t0:.0f} s to build/check)")
        cases = {
            "auto float64": {},
            "gram float32": {"route": "gram", "precision": "float32"},
            "features float64": {"route": "features"},
            "minibatch b=512, 1 pass": {"route": "minibatch", "batch_size": 512},
        }
        saves = {c: args.work / f"m_{i}.npy" for i, c in enumerate(cases)}
        rows = [run_child(store, c, 37, o, saves[c]) for c, o in cases.items()]
        exact = saves["auto float64"]
        report(rows, np.load(exact) if exact.exists() else None, saves)
        if exact.exists():
            from diffeat.output.plots import heatmap

            labels = [str(b) for b in range(1, 38)]
            path = heatmap(np.load(exact), labels, labels, args.work / "cka37.png", vmin=0, vmax=1,
                           title=f"synthetic ADM-256-shaped features, N={args.n}", cbar_label="CKA",
                           xlabel="block (t=90, pool=1)", ylabel="block (t=90, pool=1)")
            print(f"heatmap: {path}")

    if not args.skip_ooc:
        n = args.ooc_n
        store = args.work / f"ooc_n{n}.zarr"
        build_store(store, n, [1024] * 4, seed=1)
        f32 = 4 * n * 1024 * 4
        print(f"\n[2] out of core: 4 settings × N={n} × D=1024: {f32 / 2**30:.2f} GiB as float32, "
              f"{2 * f32 / 2**30:.2f} GiB as float64")
        extra = args.cap_extra or 600
        saves = {"uncapped (in memory)": args.work / "o_ref.npy", "capped auto": args.work / "o_cap.npy",
                 "capped minibatch b=512": args.work / "o_mb.npy"}
        rows = [run_child(store, "uncapped (in memory)", 4, {}, saves["uncapped (in memory)"]),
                run_child(store, "capped auto", 4, {}, saves["capped auto"], cap_extra=extra, try_load=True),
                run_child(store, "capped minibatch b=512", 4, {"route": "minibatch"}, saves["capped minibatch b=512"],
                          cap_extra=extra)]
        ref = saves["uncapped (in memory)"]
        report(rows, np.load(ref) if ref.exists() else None, saves)
        for r in rows:
            if "plan" in r:
                print(f"  {r['case']}: in_memory={r['plan']['in_memory']} rows={r['plan']['rows']} "
                      f"budget={r['plan']['budget'] / 2**20:.0f} MiB, VmPeak {r['vm_peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
