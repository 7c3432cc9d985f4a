"""Team stores on S3: every store command against a real S3 API server with IAM enforced.

The server is moto's server mode on loopback (``tests/s3server.py``), reached through the
real CLI with credentials and endpoint from the environment (``AWS_ENDPOINT_URL`` and keys)
or from ``--storage-options`` only. Nothing of diffeat is mocked.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from diffeat.cli import main

pytest_plugins = ["s3server"]

LIMIT = 40  # samples per split: digits has 10 classes; the probe needs a few per class
EXTRACT = ["extract", "--dataset", "digits", "--block", "2,3", "--t", "50", "--limit", str(LIMIT),
           "--device", "cpu", "--num-workers", "0", "--batch-size", "20"]
PROBE = ["--dataset", "digits", "--block", "3", "--t", "50", "--pool", "1", "--head", "linear", "--epochs", "2",
         "--min-steps", "5", "--recipe", "paper", "--lr", "0.1", "--wd", "0", "--device", "cpu", "--no-save-weights", "--json"]
CKA = ["--dataset", "digits", "--split", "test", "--a", "block=2,t=50,pool=1", "--b", "block=3,t=50,pool=1",
       "--json"]


def cli(*args: str, storage_options: dict | None = None):
    """Run ``diffeat ARGS`` in-process; ``storage_options`` become ``--storage-options JSON``."""
    argv = list(args) + (["--storage-options", json.dumps(storage_options)] if storage_options else [])
    return CliRunner().invoke(main, argv)


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def one_line_error(result) -> str:
    """The CLI failed with exactly one ``Error:`` line and no traceback; return that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def s3_store(s3server, tiny_model_dir):
    """One extract into s3://<bucket>/feats.zarr, credentials and endpoint from the environment only."""
    bucket = s3server.bucket("feats")
    url = f"s3://{bucket}/feats.zarr"
    with s3server.environment(read_only=False):
        out = ok(cli(*EXTRACT, "--model", str(tiny_model_dir), "--store", url, "--json"))
    report = json.loads(out[out.index("{"):])
    assert {s["outcome"] for s in report["settings"]} == {"written"} and len(report["settings"]) == 4
    return bucket, url


def test_server_enforces_iam(s3server, s3_bucket):
    from botocore.exceptions import ClientError

    s3server.client("writer").put_object(Bucket=s3_bucket, Key="a", Body=b"1")
    with pytest.raises(ClientError, match="AccessDenied"):
        s3server.client("reader").put_object(Bucket=s3_bucket, Key="b", Body=b"2")
    assert s3server.client("reader").get_object(Bucket=s3_bucket, Key="a")["Body"].read() == b"1"
    assert s3server.objects(s3_bucket) == {"a": 1}


def test_extract_with_env_then_ls(s3server, s3_store, s3_env):
    bucket, url = s3_store
    env = s3_env(read_only=False)
    assert set(env) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    keys = s3server.objects(bucket)
    assert "feats.zarr/zarr.json" in keys and not any("_writetest" in k for k in keys)
    entries = json.loads(ok(cli("ls", "--store", url, "--json")))
    got = {(e["split"], e["block"], e["t"], e["pool"], e["status"], tuple(e["shape"])) for e in entries
           if e.get("name") is None}
    assert got == {(split, b, 50, 1, "complete", (LIMIT, 32, 1, 1)) for split in ("train", "test") for b in (2, 3)}
    text = ok(cli("ls", "--store", url))
    assert text.count("complete") >= 4 and "b3/t50/p1" in text


def test_features_on_s3_equal_a_local_extract(s3_store, s3_env, tiny_model_dir, store_path):
    from diffeat.store import open_store

    _, url = s3_store
    s3_env(read_only=True)
    ok(cli(*EXTRACT, "--model", str(tiny_model_dir), "--store", store_path))
    remote, local = open_store(url), open_store(store_path)
    settings = [s for s in local.list_settings() if s.name is None]
    assert len(settings) == 4
    for s in settings:
        a = remote.open_features(dataset="digits", split=s.split, block=s.block, t=s.t, pool=s.pool)
        b = local.open_features(dataset="digits", split=s.split, block=s.block, t=s.t, pool=s.pool)
        assert a.info.settings_hash == b.info.settings_hash and a.info.path == b.info.path
        x, y = np.asarray(a.array[:]), np.asarray(b.array[:])
        assert x.dtype == y.dtype == np.float16 and x.tobytes() == y.tobytes()  # bitwise
        assert (a.ids == b.ids).all() and (a.labels == b.labels).all()


def test_read_only_credentials_read_but_never_write(s3server, s3_store, s3_env, tmp_path):
    """ls, probe, cka and verify work with keys that may only list and get; extract and import are refused
    before they write anything (extract before it even loads the model)."""
    bucket, url = s3_store
    s3_env(read_only=True)
    before = s3server.objects(bucket)

    assert len(json.loads(ok(cli("ls", "--store", url, "--json")))) >= 4
    (result,) = json.loads(ok(cli("probe", "--store", url, *PROBE, "--out", str(tmp_path / "probe"))))
    assert result["head"] == "linear" and result["n_train"] == LIMIT and 0.0 <= result["top1"] <= 1.0
    pair = json.loads(ok(cli("cka", "--store", url, *CKA)))
    assert pair["n"] == LIMIT and -1.0 <= pair["cka"] <= 1.0 + 1e-6
    assert "0 with problems" in ok(cli("verify", "--store", url))

    # extract: refused before the model is even loaded (this model path does not exist)
    start = time.perf_counter()
    line = one_line_error(cli(*EXTRACT, "--block", "4", "--model", str(tmp_path / "no-such-model"), "--store", url))
    assert time.perf_counter() - start < 10
    assert url in line and "not writable" in line and "no-such-model" not in line
    # import: refused too, with the store named
    np.save(tmp_path / "x.npy", np.zeros((LIMIT, 8), np.float32))
    line = one_line_error(cli("import", str(tmp_path / "x.npy"), "--store", url, "--dataset", "digits",
                              "--split", "test", "--name", "zeros"))
    assert url in line and "not writable" in line
    assert s3server.objects(bucket) == before  # nothing written, not even a write probe


def test_read_only_credentials_cannot_start_a_store(s3server, s3_bucket, s3_env, tmp_path):
    s3_env(read_only=True)
    url = f"s3://{s3_bucket}/new.zarr"
    line = one_line_error(cli(*EXTRACT, "--model", str(tmp_path / "no-such-model"), "--store", url))
    assert url in line and "not writable" in line
    assert s3server.objects(s3_bucket) == {}


def test_probe_cka_import_with_write_credentials(s3server, s3_store, s3_env, tmp_path):
    bucket, url = s3_store
    s3_env(read_only=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((LIMIT, 16)).astype(np.float32)
    np.save(tmp_path / "ext.npy", x)
    out = json.loads(ok(cli("import", str(tmp_path / "ext.npy"), "--store", url, "--dataset", "digits",
                            "--split", "test", "--name", "ext", "--store-dtype", "float32", "--json")))
    assert out["shape"][0] == LIMIT and int(np.prod(out["shape"][1:])) == 16 and out["name"] == "ext"
    assert any(k.startswith(f"feats.zarr/{out['path']}/") for k in s3server.objects(bucket))
    names = {e.get("name") for e in json.loads(ok(cli("ls", "--store", url, "--json")))}
    assert "ext" in names
    pair = json.loads(ok(cli("cka", "--store", url, "--dataset", "digits", "--split", "test",
                             "--a", "block=3,t=50,pool=1", "--b", "name=ext", "--json")))
    assert pair["n"] == LIMIT and pair["b"] == "ext" and -1.0 <= pair["cka"] <= 1.0 + 1e-6
    (result,) = json.loads(ok(cli("probe", "--store", url, *PROBE, "--out", str(tmp_path / "probe"))))
    assert result["block"] == 3


def test_storage_options_alone(s3server, s3_bucket, s3_env, tiny_model_dir, tmp_path):
    env = s3_env(None)  # no AWS variable, no ~/.aws: only --storage-options can reach the server
    assert not any(k in env for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"))
    url = f"s3://{s3_bucket}/team/feats.zarr"
    writer, reader = s3server.storage_options(False), s3server.storage_options(True)
    ok(cli("extract", "--dataset", "digits", "--split", "test", "--block", "2", "--t", "50", "--limit", "8",
           "--device", "cpu", "--num-workers", "0", "--model", str(tiny_model_dir), "--store", url,
           storage_options=writer))
    assert "team/feats.zarr/zarr.json" in s3server.objects(s3_bucket)
    (entry,) = json.loads(ok(cli("ls", "--store", url, "--json", storage_options=reader)))
    assert entry["status"] == "complete" and entry["shape"] == [8, 32, 1, 1]
    line = one_line_error(cli("extract", "--dataset", "digits", "--split", "test", "--block", "3", "--t", "50",
                              "--limit", "8", "--model", str(tmp_path / "no-such-model"), "--store", url,
                              storage_options=reader))
    assert url in line and "not writable" in line
    line = one_line_error(cli("ls", "--store", url))  # no credentials, no endpoint: refused, clearly
    assert url in line


def test_missing_bucket_wrong_prefix_and_unreachable_endpoint(s3server, s3_store, s3_env, monkeypatch):
    bucket, _ = s3_store
    s3_env(read_only=True)
    line = one_line_error(cli("ls", "--store", "s3://no-such-bucket-here/feats.zarr"))
    assert "s3://no-such-bucket-here/feats.zarr" in line and "bucket 'no-such-bucket-here' does not exist" in line
    line = one_line_error(cli("probe", "--store", f"s3://{bucket}/wrong.zarr", *PROBE))
    assert f"no feature store at s3://{bucket}/wrong.zarr" in line and "nothing is stored" in line
    line = one_line_error(cli("cka", "--store", f"s3://{bucket}", *CKA))  # the bucket, not the store in it
    assert f"s3://{bucket}" in line and "no zarr.json" in line

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s3server.forget_filesystems()
    line = one_line_error(cli("ls", "--store", f"s3://{bucket}/feats.zarr"))
    assert f"s3://{bucket}/feats.zarr" in line and "cannot reach" in line
