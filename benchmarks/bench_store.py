"""Store benchmark: how fast diffeat reads (and writes) a feature setting, against the limits.

A synthetic setting of the chosen shape (default: the issue's 20,000 × 4,096×2×2 float16,
655 MB, stored sharded as diffeat lays it out) is written through diffeat's import path
(``diffeat.store.imports.import_features``, what ``diffeat import`` runs). Then every reader
reads the whole array, in one run, interleaved (reader A, B, C, ..., then again A, B, C ...),
so that the machine's load falls on all of them alike:

=====================  ====================================================================
raw objects            the chunk/shard files' bytes, no decoding
numcodecs decode       ``numcodecs.Blosc().decode`` of every chunk from bytes already in memory
                       (single thread): **the limit every ratio is taken against**
crc32c                 ``google_crc32c`` over every chunk's bytes: the checksum every diffeat read
                       verifies (zarr-python's crc32c codec does too), which decoding alone skips
decode into a reused   the same decode into each chunk's place in an array allocated once (and,
array                  from float16, decoded in a cache-sized scratch and cast to float32 by torch):
                       the floor of a streaming reader that decodes into reused buffers; as float32
                       it writes twice the bytes (1.3 GB at about 6.5 GB/s measured here)
decode into a new      the same into a newly allocated array: what any reader that returns the whole
array                  array in memory pays at least, since a new array's first touch costs a page
                       fault per 4 KiB (0.16–1.06 s of kernel time per 1.3 GB on the 2-core VM,
                       varying run to run)
np.load                the same values from a ``.npy`` file
zarr-python            ``array[:]``
tensorstore            ``ts.open(zarr3 spec).read()`` (when tensorstore is importable)
FeatureSet.load        ``FeatureSet.load(float16 / float32)``
iter_blocks            ``FeatureSet.iter_blocks(4096 rows, float16 / float32)``, into new blocks and
                       into reused buffers (``reuse=True``: what the probe's and CKA's passes do)
fast path              ``diffeat.store.fastread``: float16 and float32 out, 1 and 2 threads, into a
                       new array and block by block into one buffer kept across rounds (the steady
                       state of a long pass; ``iter_blocks(reuse=True)`` allocates its ``2 + prefetch``
                       buffers afresh each pass, so a 5-block array reuses only two)
=====================  ====================================================================

Figures per reader: median wall and CPU seconds (``time.process_time``: every thread of the
process) over the rounds, decoded MB/s (store-dtype bytes / wall), and CPU and wall as a
multiple of the numcodecs decode. Files are read from the page cache (warm): the benchmark
measures the CPU cost of reading, not the disk.

Writing (``--write``): the same array through ``import_features``, through the extract writer
(256-row batches into a ``SettingWriter`` on its ``BackgroundWriter`` thread, as ``diffeat
extract`` hands it the forward's output), through plain zarr (``zarr.create_array`` with
diffeat's chunks, shards and codecs, then ``array[:] = x``) and ``np.save``, interleaved over
the rounds, each into a fresh directory.

Usage::

    python benchmarks/bench_store.py [--rows 20000] [--row-shape 4096,2,2] [--dtype float16]
                                     [--rounds 3] [--work DIR] [--only fast,numcodecs] [--write]

Prints the tables and the machine; nothing here is a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def synthetic(rows: int, row_shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Post-activation-like values: SiLU of a rank-64 signal plus noise, with per-channel gains.

    As float16 they compress about 1.04× with diffeat's codecs, like the activations measured in
    zarr_store.md (1.02–1.11×). Values that do not compress at all (iid data with per-feature
    scales) make blosc store its blocks raw, and decoding becomes a memcpy: not what a real
    setting costs.
    """
    rng = np.random.default_rng(seed)
    d = int(np.prod(row_shape))
    per_channel = int(np.prod(row_shape[1:])) if len(row_shape) > 1 else 1
    gain = np.exp(0.2 * rng.standard_normal(d // per_channel)).repeat(per_channel).astype(np.float32)
    mix = rng.standard_normal((64, d), dtype=np.float32) / 8
    out = np.empty((rows, d), dtype=dtype)
    for lo in range(0, rows, 2048):
        hi = min(rows, lo + 2048)
        pre = rng.standard_normal((hi - lo, 64), dtype=np.float32) @ mix
        pre += 0.7 * rng.standard_normal((hi - lo, d), dtype=np.float32)
        pre *= gain
        out[lo:hi] = pre / (1.0 + np.exp(-pre))
    return out.reshape((rows,) + row_shape)


def store_with_table(path: Path, n: int):
    """A new store holding the sample table of ``synthetic``/``train`` (what an import checks against)."""
    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.writer import write_sample_table

    fs = open_store(str(path), mode="a")
    write_sample_table(fs, SampleTable("synthetic", "train", None, tuple(f"s{i}" for i in range(n)), ("",) * n,
                                       np.zeros(n, dtype=np.int64), ("all",)))
    return fs


def write_import(fs, x: np.ndarray) -> None:
    """``x`` as imported features ``bench`` of ``synthetic``/``train`` (what ``diffeat import`` runs)."""
    from diffeat.store.imports import import_features

    import_features(fs, "synthetic", "train", "bench", x, store_dtype=str(x.dtype))


def write_as_extract(fs, x: np.ndarray, batch: int = 256) -> None:
    """``x`` written the way ``diffeat extract`` writes a setting: ``batch``-row batches handed to a
    ``SettingWriter`` through the ``BackgroundWriter`` thread, whole units written as they fill."""
    from diffeat.store.layout import settings_hash
    from diffeat.store.writer import BackgroundWriter, SettingWriter

    settings = {"bench": "extract writer", "shape": list(x.shape), "store_dtype": str(x.dtype)}
    meta = {"settings": settings, "settings_hash": settings_hash(settings),
            "setting": {"model": "bench", "dataset": "synthetic", "split": "train", "block": 0, "t": 0, "pool": 0,
                        "name": None}}
    writer = SettingWriter.open(fs, "features/bench/synthetic/train/b0-t0-p0", tuple(x.shape), str(x.dtype), meta,
                                label="bench")
    writer.claim_all()
    background = BackgroundWriter()
    for lo in range(0, len(x), batch):
        background.put(writer, np.arange(lo, min(len(x), lo + batch)), x[lo:lo + batch])
    background.close()
    assert writer.publish()


def write_plain_zarr(path: Path, x: np.ndarray) -> None:
    """``x`` with plain zarr, with the chunks, shards and codecs diffeat would choose."""
    import zarr

    from diffeat.store.layout import plan_chunks
    from diffeat.store.writer import compressors

    plan = plan_chunks(len(x), int(np.prod(x.shape[1:])) * x.dtype.itemsize)
    row = tuple(x.shape[1:])
    arr = zarr.create_array(str(path), shape=x.shape, dtype=x.dtype, chunks=(plan.chunk_rows,) + row,
                            shards=(plan.shard_rows,) + row if plan.shard_rows else None, compressors=compressors(),
                            fill_value=float("nan"))
    arr[:] = x


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; the result is dropped before the clocks stop."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    del result
    return time.perf_counter() - wall, time.process_time() - cpu


def object_files(array) -> list[Path]:
    """The chunk (or shard) files of a local zarr array."""
    root = Path(str(array.store.root)) / array.path / "c"
    return sorted(p for p in root.rglob("*") if p.is_file())


def run_rounds(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Every case once per round, in the same order each round (interleaved)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))
        print(f"# round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return times


def table(times: dict[str, list[tuple[float, float]]], mb: float, limit: str, what: str = "reader",
          versus: str = "decode") -> None:
    """Print median wall/CPU, MB/s and ratios against the ``limit`` case."""
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    lw, lc = med[limit]
    cpu_h, wall_h = f"CPU vs {versus}", f"wall vs {versus}"
    print(f"| {what:34s} | wall s | CPU s | MB/s (wall) | {cpu_h} | {wall_h} |")
    print(f"|{'-' * 36}|-------:|------:|------------:|{'-' * (len(cpu_h) + 1)}:|{'-' * (len(wall_h) + 1)}:|")
    for k, (w, c) in med.items():
        print(f"| {k:34s} | {w:6.3f} | {c:5.3f} | {mb / w:11.0f} | {c / lc:{len(cpu_h) - 1}.2f}× | "
              f"{w / lw:{len(wall_h) - 1}.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--row-shape", default="4096,2,2", help="C,k,k (or D) of one row")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="/tmp/diffeat_bench_store")
    parser.add_argument("--only", default=None, help="comma-separated name fragments of the readers to time")
    parser.add_argument("--write", action="store_true", help="also time writing (import vs plain zarr vs np.save)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not burn CPU time

    import numcodecs
    import numcodecs.blosc
    import torch
    import zarr

    from diffeat.store import open_store
    from diffeat.store.fastread import FastReader

    torch.set_num_threads(os.cpu_count() or 1)
    row_shape = tuple(int(v) for v in args.row_shape.split(","))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    x = synthetic(args.rows, row_shape, args.dtype)
    mb = x.nbytes / 1e6
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, "
          f"numpy {np.__version__}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")

    if args.write:
        counter = iter(range(10**6))

        def fresh(name: str) -> Path:
            return work / f"w{next(counter)}-{name}"

        # The sample table is a prerequisite of an import (extract writes it), not part of it.
        tables = [store_with_table(work / f"import{r}.zarr", len(x)) for r in range(args.rounds)]
        extract_stores = [store_with_table(work / f"extract{r}.zarr", len(x)) for r in range(args.rounds)]

        def import_once():
            fs = tables.pop(0)
            write_import(fs, x)
            shutil.rmtree(fs.location)

        def extract_once():
            fs = extract_stores.pop(0)
            write_as_extract(fs, x)
            shutil.rmtree(fs.location)

        def zarr_once():
            p = fresh("plain.zarr")
            write_plain_zarr(p, x)
            shutil.rmtree(p)

        def npy_once():
            p = fresh("x.npy")
            np.save(p, x)
            p.unlink()

        print(f"\n## writing {x.shape} {x.dtype} ({mb:.0f} MB), {args.rounds} rounds, interleaved\n")
        wt = run_rounds({"plain zarr (arr[:] = x)": zarr_once, "diffeat import": import_once,
                         "extract writer (256-row batches)": extract_once, "np.save": npy_once}, args.rounds)
        table(wt, mb, "plain zarr (arr[:] = x)", what="writer", versus="zarr")

    store = work / "store.zarr"
    t0 = time.perf_counter()
    write_import(store_with_table(store, len(x)), x)
    print(f"\n# wrote {store} through diffeat import in {time.perf_counter() - t0:.1f} s")
    np.save(work / "x.npy", x)
    fset = open_store(str(store)).open_features(dataset="synthetic", split="train", name="bench")
    array = fset.array
    layout = FastReader.for_array(array).layout
    files = object_files(array)
    stored = sum(p.stat().st_size for p in files)
    print(f"# array {array.shape} {array.dtype}: chunks of {layout.chunk_rows} rows, "
          f"{f'shards of {layout.shard_rows} rows' if layout.shard_rows else 'unsharded'}, {len(files)} objects, "
          f"{stored / 1e6:.0f} MB stored ({x.nbytes / stored:.3f}×)")

    # The chunks' encoded bytes in memory (crc32c stripped), for the decode-only limit.
    encoded: list[bytes] = []
    for p in files:
        data = p.read_bytes()
        if layout.shard_rows:
            index = np.frombuffer(data[-layout.index_bytes:][:16 * layout.chunks_per_shard], "<u8").reshape(-1, 2)
            encoded += [data[o:o + b - 4] for o, b in index.tolist() if o != 2**64 - 1]
        else:
            encoded.append(data[:-4])
    blosc = numcodecs.Blosc()

    def decode_all():
        for chunk in encoded:
            blosc.decode(chunk)

    chunk_bytes = layout.chunk_bytes

    reused: dict[np.dtype, np.ndarray] = {}

    def decode_into(dtype: np.dtype, reuse: bool = False) -> np.ndarray:
        """Every chunk decoded into its place in a new (or a reused) array (float32: through a scratch, cast by torch)."""
        shape = (len(encoded) * layout.chunk_rows,) + x.shape[1:]
        if reuse:
            out = reused.get(dtype)
            if out is None:
                out = reused[dtype] = np.zeros(shape, dtype)
        else:
            out = np.empty(shape, dtype)
        if dtype == x.dtype:
            flat = out.reshape(-1).view(np.uint8)
            for i, chunk in enumerate(encoded):
                numcodecs.blosc.decompress(chunk, flat[i * chunk_bytes:(i + 1) * chunk_bytes])
            return out
        scratch = np.empty(chunk_bytes // x.dtype.itemsize, x.dtype)
        dst, src = torch.from_numpy(out.reshape(-1)), torch.from_numpy(scratch)
        for i, chunk in enumerate(encoded):
            numcodecs.blosc.decompress(chunk, scratch)
            dst[i * len(scratch):(i + 1) * len(scratch)].copy_(src)
        return out

    def raw_all():
        for p in files:
            p.read_bytes()

    def crc_all():
        for chunk in crc_chunks:
            google_crc32c.value(chunk)

    import google_crc32c

    crc_chunks = [np.frombuffer(c, np.uint8) for c in encoded]
    f32 = np.dtype(np.float32)
    cases: dict[str, Callable[[], object]] = {
        "numcodecs decode (1 thread)": decode_all,
        "crc32c of every chunk": crc_all,
        "decode into a reused array": lambda: decode_into(x.dtype, reuse=True),
        "decode into a new array": lambda: decode_into(x.dtype),
        **({"decode + cast into a reused float32": lambda: decode_into(f32, reuse=True),
            "decode + cast into a new float32": lambda: decode_into(f32)} if x.dtype == np.float16 else {}),
        "raw object files, no decode": raw_all,
        "np.load": lambda: np.load(work / "x.npy"),
        "zarr-python arr[:]": lambda: array[:],
    }
    try:
        import tensorstore as ts

        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(str(array.store.root)) / array.path)}}
        tstore = ts.open(spec).result()
        cases["tensorstore read()"] = lambda: tstore.read().result()
    except ImportError:
        print("# tensorstore is not installed: not timed")
    cases.update({
        "FeatureSet.load(float16)": lambda: fset.load(np.float16),
        "FeatureSet.load(float32)": lambda: fset.load(np.float32),
        "iter_blocks float16": lambda: [b.shape for _, b in fset.iter_blocks(4096, np.float16)],
        "iter_blocks float32": lambda: [b.shape for _, b in fset.iter_blocks(4096, np.float32)],
        "iter_blocks float16, reused buffers": lambda: [b.shape for _, b in fset.iter_blocks(4096, np.float16,
                                                                                             reuse=True)],
        "iter_blocks float32, reused buffers": lambda: [b.shape for _, b in fset.iter_blocks(4096, np.float32,
                                                                                             reuse=True)],
    })
    blocks = fset.block_ranges(4096)
    steady: dict[np.dtype, np.ndarray] = {}  # one block buffer per dtype, kept across rounds

    def into_reused_blocks(reader: FastReader, dtype: np.dtype) -> None:
        """Every 4,096-row block read into the same buffer: a long streaming pass's steady state."""
        buf = steady.setdefault(dtype, np.zeros((blocks[0][1],) + x.shape[1:], dtype))
        for lo, hi in blocks:
            reader.read(lo, hi, dtype, out=buf[:hi - lo])

    for threads in (1, 2):
        reader = FastReader.for_array(array, threads=threads)
        for dtype in (np.dtype(np.float16), np.dtype(np.float32)):
            name = f"fast path {dtype.name}, {threads} thread{'s' if threads > 1 else ''}"
            cases[name] = lambda r=reader, d=dtype: r.read(0, len(x), d)
            cases[f"{name}, reused blocks"] = lambda r=reader, d=dtype: into_reused_blocks(r, d)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        cases = {k: v for k, v in cases.items() if k.startswith(("numcodecs", "decode", "crc")) or any(w in k for w in wanted)}

    # Correctness before speed: the fast path returns zarr's values bitwise.
    ref = np.asarray(array[:])
    for dtype in (np.float16, np.float32):
        got = FastReader.for_array(array).read(0, len(x), dtype)
        assert np.array_equal(got, ref.astype(dtype), equal_nan=True), "fast path differs from zarr-python"
    del ref, got
    timed(decode_all)  # warm the page cache and the allocator
    print(f"\n## reading {x.shape} {x.dtype} ({mb:.0f} MB decoded), {args.rounds} rounds, interleaved, warm page "
          f"cache\n")
    rt = run_rounds(cases, args.rounds)
    table(rt, mb, "numcodecs decode (1 thread)")
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
