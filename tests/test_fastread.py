"""The fast read path (``diffeat.store.fastread``) returns bitwise what zarr-python reads.

Arrays are written by zarr-python itself with diffeat's codecs (and by ``diffeat import``),
in every layout diffeat writes: unsharded chunks, shards of inner chunks, a partial last
chunk/shard, chunks and inner chunks that were never written; float16 and float32; read
locally and from a real S3 server (moto, tests/s3server.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from diffeat.errors import StoreError
from diffeat.store.fastread import FastReader, layout_of, read_rows
from diffeat.store.writer import compressors

pytest_plugins = ["s3server"]

ROW = (12, 2, 2)
N = 100  # not a multiple of any chunk or shard: the last ones are partial
RANGES = [(0, N), (0, 1), (5, 37), (31, 33), (60, N), (N - 1, N), (17, 17)]
LAYOUTS = {"chunked": {"chunks": 16}, "sharded": {"chunks": 8, "shards": 32}}


def _values(dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N,) + ROW) * np.exp(rng.standard_normal(ROW))).astype(dtype)


def _create(store, dtype: str, layout: str, path: str | None = None) -> zarr.Array:
    spec = LAYOUTS[layout]
    return zarr.create_array(store, name=path, shape=(N,) + ROW, dtype=dtype, chunks=(spec["chunks"],) + ROW,
                             shards=(spec["shards"],) + ROW if "shards" in spec else None,
                             compressors=compressors(), fill_value=float("nan"))


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Bitwise equality (NaN fill values included)."""
    return got.dtype == want.dtype and got.shape == want.shape and np.array_equal(
        np.ascontiguousarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8))


def _check_all_ranges(array: zarr.Array, threads: int | None = None) -> None:
    reader = FastReader.for_array(array, threads=threads)
    assert reader is not None
    for lo, hi in RANGES:
        want = array[lo:hi]
        for dtype in (None, np.float32):
            expected = want if dtype is None else want.astype(dtype)
            assert _same(reader.read(lo, hi, dtype), expected), (lo, hi, dtype)
    out = np.empty((N,) + ROW, np.float32)
    assert reader.read(0, N, np.float32, out=out) is out and _same(out, array[:].astype(np.float32))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_local_reads_equal_zarr_bitwise(tmp_path, layout, dtype):
    array = _create(str(tmp_path / "a.zarr"), dtype, layout)
    array[:] = _values(dtype)
    lay = layout_of(array)
    assert (lay.chunk_rows, lay.shard_rows) == (8, 32) if layout == "sharded" else (16, None)
    for threads in (1, 3):
        _check_all_ranges(array, threads)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_unwritten_chunks_read_as_the_fill_value(tmp_path, layout):
    array = _create(str(tmp_path / "a.zarr"), "float16", layout)
    array[:44] = _values("float16")[:44]  # later chunks (and in a shard, later inner chunks) never written
    assert np.isnan(array[50:]).all()
    _check_all_ranges(array)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rows_of_a_lost_object_are_reported_without_a_scan(tmp_path, layout):
    """``nan_rows``: the fast path names the rows it filled; zarr-python's fallback scans for NaN rows."""
    x = _values("float16")
    array = _create(str(tmp_path / "a.zarr"), "float16", layout)
    array[:] = x
    (tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0").unlink()  # rows 16-31 (chunks) or 32-63 (shards)
    lost = set(range(16, 32)) if layout == "chunked" else set(range(32, 64))
    plain = zarr.create_array(str(tmp_path / "v2.zarr"), shape=x.shape, dtype="float16", chunks=(16,) + ROW,
                              zarr_format=2, fill_value=float("nan"))
    plain[:] = x
    (tmp_path / "v2.zarr" / "1.0.0.0").unlink()
    assert layout_of(plain) is None
    for arr, want in ((array, lost), (plain, set(range(16, 32)))):
        for lo, hi in RANGES:
            found: list[tuple[int, int]] = []
            block = read_rows(arr, lo, hi, np.float32, nan_rows=found)
            assert {r for a, b in found for r in range(a, b)} == {r for r in want if lo <= r < hi}, (lo, hi)
            assert _same(block, arr[lo:hi].astype(np.float32))


def test_a_diffeat_import_reads_like_featureset_load(tmp_path):
    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.imports import import_features
    from diffeat.store.writer import write_sample_table

    x = _values("float32", seed=3)
    fs = open_store(str(tmp_path / "s.zarr"), mode="a")
    write_sample_table(fs, SampleTable("d", "train", None, tuple(f"s{i}" for i in range(N)), ("",) * N,
                                       np.zeros(N, np.int64), ("c",)))
    import_features(fs, "d", "train", "x", x, store_dtype="float16")
    features = open_store(str(tmp_path / "s.zarr")).open_features(dataset="d", split="train", name="x")
    assert _same(read_rows(features.array, 0, N, np.float32), features.load(np.float32))
    assert _same(read_rows(features.array, 3, 9, None), features.array[3:9])


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_blocks_in_reused_buffers_equal_new_blocks(tmp_path, prefetch):
    """``iter_blocks(reuse=True)`` decodes into ``prefetch + 2`` buffers in turn, with the values of new blocks.

    Each block is checked when it arrives, against the imported values; the count of distinct
    buffers pins the ring's size (one buffer short, the reading thread would overwrite the
    block the caller holds).
    """
    from diffeat.data.table import SampleTable
    from diffeat.store import open_store
    from diffeat.store.imports import import_features
    from diffeat.store.streaming import BlockRing
    from diffeat.store.writer import write_sample_table

    n = 1000
    x = np.random.default_rng(4).standard_normal((n, 16, 2, 2)).astype(np.float16)
    fs = open_store(str(tmp_path / "s.zarr"), mode="a")
    write_sample_table(fs, SampleTable("d", "train", None, tuple(f"s{i}" for i in range(n)), ("",) * n,
                                       np.zeros(n, np.int64), ("c",)))
    import_features(fs, "d", "train", "x", x, store_dtype="float16", chunk_rows=64)
    features = open_store(str(tmp_path / "s.zarr")).open_features(dataset="d", split="train", name="x")
    rows = 128  # two chunks per block, the last one partial: 8 blocks
    assert len(features.block_ranges(rows)) == 8
    for dtype in (np.float16, np.float32):
        held, buffers = [], set()
        for lo, block in features.iter_blocks(rows, dtype, prefetch=prefetch, reuse=True):
            assert block.dtype == dtype and block.flags.c_contiguous
            held.append(block)
            buffers.add(block.__array_interface__["data"][0])
            assert _same(block.copy(), x[lo:lo + len(block)].astype(dtype)), (dtype, lo)
        assert len(buffers) == (prefetch + 2 if prefetch else 1)
        assert not _same(np.concatenate(held), x.astype(dtype))  # held blocks were overwritten: copy what you keep
        fresh = [b for _, b in features.iter_blocks(rows, dtype, prefetch=prefetch)]
        assert _same(np.concatenate(fresh), x.astype(dtype))
    ring = BlockRing(2, 4, (3,), np.float32)
    assert ring.take(4).shape == (4, 3) and ring.take(2).shape == (2, 3)
    with pytest.raises(ValueError, match="does not fit"):
        ring.take(5)


def test_a_damaged_chunk_fails_its_checksum(tmp_path):
    array = _create(str(tmp_path / "a.zarr"), "float16", "chunked")
    array[:] = _values("float16")
    chunk = tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0xFF
    chunk.write_bytes(bytes(data))
    reader = FastReader.for_array(zarr.open_array(str(tmp_path / "a.zarr"), mode="r"))
    assert _same(reader.read(0, 16), array[:16])  # the other chunks still read
    with pytest.raises(StoreError, match=r"c/1/0/0/0.*crc32c"):
        reader.read(10, 20)
    shard = _create(str(tmp_path / "b.zarr"), "float16", "sharded")
    shard[:] = _values("float16")
    obj = tmp_path / "b.zarr" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(obj.read_bytes())
    data[-2] ^= 0xFF  # the shard index's checksum
    obj.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="index of shard.*crc32c"):
        FastReader.for_array(zarr.open_array(str(tmp_path / "b.zarr"), mode="r")).read(0, 4)


def test_layouts_it_does_not_know_fall_back_to_zarr(tmp_path):
    from zarr.codecs import TransposeCodec, ZstdCodec

    x = _values("float32")
    others = {
        "zstd": dict(chunks=(16,) + ROW, compressors=[ZstdCodec()]),
        "rows split": dict(chunks=(16, 6, 2, 2), compressors=compressors()),
        "transpose": dict(chunks=(16,) + ROW, filters=[TransposeCodec(order=(0, 2, 3, 1))], compressors=compressors()),
        "zarr v2": dict(chunks=(16,) + ROW, zarr_format=2),
    }
    for name, kwargs in others.items():
        array = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=x.shape, dtype="float32", **kwargs)
        array[:] = x
        assert layout_of(array) is None, name
        assert _same(read_rows(array, 5, 40, np.float32), x[5:40]), name
    assert _same(read_rows(x, 2, 7, np.float16), x[2:7].astype(np.float16))  # not zarr at all


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_s3_reads_equal_zarr_bitwise(s3server, s3_bucket, s3_env, layout):
    from diffeat.store.objects import make_zarr_store

    s3_env(None)
    url = f"s3://{s3_bucket}/feats.zarr"
    writer = make_zarr_store(url, read_only=False, storage_options=s3server.storage_options(read_only=False))
    written = _create(writer, "float16", layout, path="x/data")
    written[:70] = _values("float16")[:70]
    reader_store = make_zarr_store(url, read_only=True, storage_options=s3server.storage_options(read_only=True))
    array = zarr.open_array(store=reader_store, path="x/data", mode="r")
    reader = FastReader.for_array(array)
    assert reader.objects.remote
    _check_all_ranges(array)
