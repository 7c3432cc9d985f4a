"""CKA on a dask.distributed cluster: a real LocalCluster of 2 worker processes (1 thread each)
reading a real store, against the single-process routes; the ``--workers``/``--scheduler`` options
of ``diffeat cka``; and the errors of :func:`diffeat.runtime.cluster.cluster_client`."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from diffeat.cka import ArraySource, cka_matrix
from diffeat.cka.api import open_specs, store_cka
from diffeat.cka.settings import SettingSpec, grid
from diffeat.runtime.cluster import cluster_client, normalize_address, wants_gpu
from diffeat.errors import DiffeatError, StoreError

pytest_plugins = ["s3server"]

SPLIT = ("digits", "test")
SETTINGS = grid([3, 7], [50], [1, 2])  # 4 settings, D = 32, 128, 64, 256


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """96 digits through a seeded random tiny U-Net, stored in 16-row chunks (6 per setting)."""
    from diffeat.extract import extract

    path = tmp_path_factory.mktemp("cluster") / "feats.zarr"
    extract(dataset="digits", model="random:tiny", blocks=[3, 7], ts=[50], pools=[1, 2], store=str(path),
            splits=["test"], limit=96, device="cpu", chunk_rows=16)
    return path


@pytest.fixture(scope="module")
def client():
    """The shared helper's LocalCluster: 2 worker processes, 1 thread each."""
    with cluster_client(workers=2) as c:
        info = c.scheduler_info()["workers"].values()
        assert len(info) == 2 and all(w["nthreads"] == 1 for w in info)
        yield c


def _sources(store: Path, specs=SETTINGS):
    from diffeat.store import open_store

    return open_specs(open_store(str(store)), *SPLIT, specs)


@pytest.mark.parametrize("route", ["features", "gram"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_cluster_routes_equal_single_process(store, client, route, estimator):
    # 32-row blocks / tiles over 16-row chunks: several tasks per route, several chunks per task.
    opts = {"route": route, "estimator": estimator, "block_rows": 32}
    local = cka_matrix(_sources(store), **opts)
    remote = cka_matrix(_sources(store), client=client, **opts)
    assert remote.plan["cluster"]["used"] and remote.plan["cluster"]["workers"] == 2
    assert not remote.plan["in_memory"] and remote.route == route
    np.testing.assert_allclose(remote.matrix, local.matrix, rtol=0, atol=1e-12)
    assert remote.row_labels == local.row_labels and remote.settings == local.settings


def test_cluster_rectangular_float32_and_pair_groups(store, client):
    rows, cols = _sources(store, SETTINGS[:2]), _sources(store, SETTINGS[2:])
    # float32 products: BLAS rounds them alike in two processes only up to float32 rounding
    # (an 8e-10 difference was seen once), so that is what is asserted; float64 stays at 1e-12.
    for opts, atol in (({"route": "features", "precision": "float32", "block_rows": 48}, 1e-6),
                       # a 1000 KB budget: one pass per group of pairs, each on the cluster (the largest
                       # pair's 512 KiB accumulator and a 16-row block of every setting, 225 KiB as the plan
                       # counts it, fit)
                       ({"route": "features", "memory_budget": "1000KB", "block_rows": 16}, 1e-12)):
        local = cka_matrix(rows, cols, **opts)
        remote = cka_matrix(rows, cols, client=client, **opts)
        assert remote.plan["cluster"]["used"] and remote.matrix.shape == (2, 2)
        np.testing.assert_allclose(remote.matrix, local.matrix, rtol=0, atol=atol)
    assert remote.plan["estimates"]["feature_passes"] > 1


def test_scheduler_address_and_file_and_plain_zarr_arrays(store, client, tmp_path):
    address = client.scheduler.address
    single = store_cka(str(store), *SPLIT, SETTINGS, route="gram", block_rows=32)
    by_address = store_cka(str(store), *SPLIT, SETTINGS, route="gram", block_rows=32, scheduler=address)
    assert by_address.config["scheduler"] == address and by_address.config["cluster_used"]
    np.testing.assert_allclose(by_address.matrix, single.matrix, rtol=0, atol=1e-12)
    (tmp_path / "scheduler.json").write_text(json.dumps({"address": address}))
    by_file = store_cka(str(store), *SPLIT, SETTINGS[:2], route="features", scheduler=str(tmp_path / "scheduler.json"))
    np.testing.assert_allclose(by_file.matrix, single.matrix[:2, :2], rtol=0, atol=1e-12)

    # Any zarr array on disk works too (the worker opens it from its store's path).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12)) + 50.0
    y = np.tanh(x @ rng.normal(size=(12, 7)))
    arrays = []
    for name, a in (("x", x), ("y", y)):
        z = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=a.shape, dtype="float64", chunks=(16, a.shape[1]))
        z[:] = a
        arrays.append(ArraySource(z, label=name))
    got = cka_matrix(arrays, client=client, route="features", block_rows=16)
    assert got.plan["cluster"]["used"]
    np.testing.assert_allclose(got.matrix, cka_matrix([x, y]).matrix, rtol=0, atol=1e-12)


def test_s3_store_with_storage_options_only(s3server, s3_bucket, s3_env, store, client):
    """Workers get the URL and the storage options (no AWS variable anywhere) and read S3 themselves."""
    from diffeat.extract import extract
    from diffeat.store import open_store

    s3_env(None)
    url = f"s3://{s3_bucket}/feats.zarr"
    writer = open_store(url, mode="a", storage_options=s3server.storage_options(read_only=False))
    extract(dataset="digits", model="random:tiny", blocks=[3], ts=[50], pools=[1, 2], store=writer,
            splits=["test"], limit=48, device="cpu", chunk_rows=16)
    opts = {"route": "features", "block_rows": 16, "storage_options": s3server.storage_options(read_only=True)}
    local = store_cka(url, *SPLIT, SETTINGS[:2], **opts)
    remote = store_cka(url, *SPLIT, SETTINGS[:2], scheduler=client.scheduler.address, **opts)
    assert remote.config["cluster_used"] and "secret" not in json.dumps(remote.record()).lower()
    np.testing.assert_allclose(remote.matrix, local.matrix, rtol=0, atol=1e-12)


def test_what_stays_in_this_process(store, client, caplog):
    x = np.random.default_rng(1).normal(size=(40, 5))
    with caplog.at_level(logging.WARNING, logger="diffeat"):
        arrays = cka_matrix([x, x ** 2], client=client)  # NumPy arrays: nothing a worker could open
        mini = cka_matrix(_sources(store), client=client, route="minibatch", batch_size=32)
        rbf = cka_matrix(_sources(store), client=client, kernel="rbf")
    assert not any(r.plan["cluster"]["used"] for r in (arrays, mini, rbf))
    text = caplog.text
    assert "not in a zarr store" in text and "minibatch route runs in this process" in text and "RBF" in text
    np.testing.assert_allclose(mini.matrix, cka_matrix(_sources(store), route="minibatch", batch_size=32).matrix,
                               atol=1e-12)
    # store_cka does not even start a cluster for them.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffeat"):
        r = store_cka(str(store), *SPLIT, SETTINGS[:2], route="minibatch", batch_size=32, workers=2)
    assert r.config["workers"] == 2 and not r.config["cluster_used"] and "cluster" not in r.plan
    assert "starting a local dask cluster" not in caplog.text


def test_worker_that_cannot_open_the_store_is_a_clear_error(client, tmp_path):
    a = np.random.default_rng(2).normal(size=(32, 4))
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=a.shape, dtype="float64", chunks=(16, 4))
    z[:] = a
    source = ArraySource(z, label="moved")
    shutil.move(tmp_path / "a.zarr", tmp_path / "elsewhere.zarr")  # the client's handle now points nowhere
    with pytest.raises(StoreError, match="cannot open 'moved'.*workers must see the store"):
        cka_matrix([source, source], client=client, route="features")


def test_cli_workers(store, tmp_path):
    from diffeat.cli import main

    runner = CliRunner()
    common = ["cka", "--store", str(store), "--dataset", "digits", "--split", "test", "--blocks", "3,7", "--t", "50",
              "--pool", "1-2", "--route", "features", "--json"]
    single = runner.invoke(main, ["-q", *common])
    assert single.exit_code == 0, single.output
    res = runner.invoke(main, ["-q", *common, "--workers", "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    doc, ref = json.loads(res.output), json.loads(single.output)
    assert doc["labels"] == ref["labels"]
    np.testing.assert_allclose(np.array(doc["matrix"]), np.array(ref["matrix"]), rtol=0, atol=1e-12)
    record = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert record["config"]["workers"] == 2 and record["config"]["cluster_used"]
    assert record["plan"]["cluster"]["workers"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors_are_one_line_and_fast(store):
    from diffeat.cli import main

    runner = CliRunner()
    common = ["cka", "--store", str(store), "--dataset", "digits", "--a", "block=3,t=50,pool=1",
              "--b", "block=7,t=50,pool=1"]
    for extra, match in ((["--workers", "0"], "--workers 0 is invalid"),
                         (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "not both"),
                         (["--scheduler", "not an address"], "not a scheduler address"),
                         (["--scheduler", "tcp://127.0.0.1:99999"], "not a scheduler address"),
                         (["--scheduler", "foo://host:1"], "unknown scheme"),
                         (["--scheduler", f"tcp://127.0.0.1:{_free_port()}"], "cannot reach the dask scheduler"),
                         (["--scheduler", "tcp://no-such-host.invalid:8786"], "cannot reach the dask scheduler")):
        start = time.perf_counter()
        res = runner.invoke(main, ["-q", *common, *extra])
        assert res.exit_code == 1, (extra, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], (extra, res.output)
        assert time.perf_counter() - start < 8, extra


def test_cluster_client_helper():
    with cluster_client(None, None) as nothing:
        assert nothing is None
    with pytest.raises(DiffeatError, match=r"--workers -3 is invalid: it must be a whole number of worker processes >= 1"), cluster_client(workers=-3):
        pass
    assert normalize_address("10.0.0.1") == "tcp://10.0.0.1:8786"
    assert normalize_address("10.0.0.1:9000") == "tcp://10.0.0.1:9000"
    assert normalize_address("TLS://sched.example.org:8786") == "tls://sched.example.org:8786"
    assert normalize_address("tcp://[::1]:8786") == "tcp://[::1]:8786"
    for bad in ("tcp://", "tcp://host:port", "tcp://a b:1", "http://host:1"):
        with pytest.raises(DiffeatError):
            normalize_address(bad)
    assert wants_gpu({"GPU": 1}) and wants_gpu({"cuda": 1}) and not wants_gpu({"memory": 1}) and not wants_gpu(None)
    assert SettingSpec.parse("b=3,t=50,k=1") == SETTINGS[0]


def test_a_lost_chunk_is_refused_on_the_workers(store, client, tmp_path):
    """Workers read no NaN into CKA: a deleted chunk object is a one-line error, as in a local read."""
    from diffeat.store import open_store

    copy = tmp_path / "feats.zarr"
    shutil.copytree(store, copy)
    path = open_store(str(copy)).find(dataset="digits", split="test", block=3, t=50, pool=1).path
    (copy / path / "c" / "2" / "0" / "0" / "0").unlink()  # rows 32-47 of 16-row chunks
    with pytest.raises(StoreError, match=r"dask worker .*rows \[32, 33, 34, 35, 36\] \.\.\. of .*no stored chunk"
                                         r".*verify --repair"):
        cka_matrix(_sources(copy, SETTINGS[:2]), client=client, route="features", block_rows=32)
    with pytest.raises(StoreError, match=r"rows \[32, 33, 34, 35, 36\] \.\.\. are missing"):
        cka_matrix(_sources(copy, SETTINGS[:2]), route="features", block_rows=32)
