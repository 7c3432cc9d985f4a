"""Store layout rules, the unit writer and its ledger, and plain-zarr readability."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from diffeat.errors import StoreError
from diffeat.store import check_name, open_store, plan_chunks
from diffeat.store.writer import SettingWriter


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/abs", "a\\b", "", ".hidden", "a..b", "x y"])
def test_names_never_escape_the_store_root(name):
    with pytest.raises(StoreError, match="not allowed"):
        check_name(name, "dataset")


def test_good_names_pass():
    for name in ("cub", "CUB_200_2011", "adm256-uncond", "n01440764", "a.b_c-1"):
        assert check_name(name, "dataset") == name


def test_chunk_plan_spans_rows_and_shards_large_arrays():
    small = plan_chunks(1000, 2048)
    assert small.shard_rows is None and small.chunk_rows == 1024 and small.n_units == 1
    big = plan_chunks(1_281_167, 1024 * 4 * 2)  # ImageNet train, 1024 x 2 x 2 fp16
    assert big.shard_rows is not None and big.shard_rows % big.chunk_rows == 0
    assert 32 << 20 <= big.shard_rows * 8192 <= 64 << 20
    assert big.unit_range(big.n_units - 1)[1] == 1_281_167


def _writer(store, n=100, row=(512, 8, 8)):
    attrs = {"setting": {"model": "m", "dataset": "d", "split": "train", "block": 1, "t": 0, "pool": 4,
                         "name": None}}
    # One owner for every writer of these tests: a "resumed run" here is the same process.
    w = SettingWriter.open(store, "features/m/d/train/block1_t0_pool4_abc", (n,) + row, "float16", attrs, "test",
                           owner="test")
    w.claim_all()
    return w


def test_units_are_written_whole_and_flagged_then_resumed(tmp_path):
    store = open_store(tmp_path / "s.zarr", mode="a")
    w = _writer(store)
    assert w.plan.unit_rows == 32 and w.plan.n_units == 4  # 2 MiB chunks of 64 KiB rows
    values = np.random.default_rng(0).standard_normal((100, 512, 8, 8)).astype(np.float32)
    w.add(np.arange(0, 40), values[:40])  # unit 0 complete, unit 1 partly buffered
    assert w.pending == {1, 2, 3}
    assert not w.publish() and w.status == "in_progress"
    # A new writer (a resumed run) sees unit 0 done and rows 32..99 still needed; buffered rows are gone.
    w2 = _writer(store)
    assert w2.pending == {1, 2, 3}
    np.testing.assert_array_equal(w2.rows_needed(), np.arange(32, 100))
    assert np.isnan(w2.array[32:40].astype(np.float32)).all()
    w2.add(np.arange(32, 100), values[32:])
    assert w2.publish() and w2.status == "complete"
    np.testing.assert_array_equal(w2.array[:], values.astype(np.float16))


def test_non_finite_features_are_refused(tmp_path):
    store = open_store(tmp_path / "s.zarr", mode="a")
    w = _writer(store, n=32)
    values = np.zeros((32, 512, 8, 8), np.float32)
    values[5, 0, 0, 0] = 1e6  # overflows float16
    with pytest.raises(StoreError, match=r"rows \[5\].*overflow.*--store-dtype float32"):
        w.add(np.arange(32), values)
    assert w.pending == {0}


def test_missing_and_read_only_stores(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        open_store(tmp_path / "nothing.zarr")
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.attrs["x"] = 1
    with pytest.raises(StoreError, match="not a diffeat feature store"):
        open_store(tmp_path / "plain.zarr")
    open_store(tmp_path / "ro.zarr", mode="a")
    os.chmod(tmp_path / "ro.zarr", 0o555)
    try:
        if os.access(tmp_path / "ro.zarr", os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(StoreError, match="read-only"):
            open_store(tmp_path / "ro.zarr", mode="a")
        assert open_store(tmp_path / "ro.zarr").list_settings() == []
    finally:
        os.chmod(tmp_path / "ro.zarr", 0o755)
