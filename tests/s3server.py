"""A real S3 API server on loopback, with IAM enforced: pytest fixtures for remote-store tests.

moto's server mode (its WSGI app as ``python -m moto.server`` runs it, from PyPI:
``moto[server]``) runs in a subprocess on 127.0.0.1 and a free port, once per test session,
with requests serialised so that conditional puts are atomic as on S3 (``SERVER_PROGRAM``).
It enforces IAM: the first calls (creating three IAM users, their policies and access keys)
are made without authentication (``INITIAL_NO_AUTH_ACTION_COUNT`` in the server's
environment); every later request must be signed by one of those keys and is checked against
its user's policy. The fixture checks that before any test runs (``_check_enforced``).

Keys (``S3Server.keys[role]``):

* ``admin``: ``s3:*`` (creates the per-test buckets, and lists them for the tests);
* ``writer``: the policy docs/sharing.md gives writers: ``s3:ListBucket`` on the bucket,
  ``s3:GetObject``, ``s3:PutObject``, ``s3:DeleteObject`` on its objects;
* ``reader``: ``s3:ListBucket`` and ``s3:GetObject`` only: a PutObject is AccessDenied.

Use from a test module::

    pytest_plugins = ["s3server"]

    def test_x(s3server, s3_bucket, s3_env):
        env = s3_env(read_only=False)     # os.environ now points at the server, writer keys
        url = f"s3://{s3_bucket}/feats.zarr"
        ...
        s3server.objects(s3_bucket)        # {key: size} of everything in the bucket

For a subprocess: ``subprocess.run(..., env=s3server.process_env(read_only=True))``.
For storage options instead of the environment: ``s3server.storage_options(read_only=...)``
after ``s3_env(None)`` (which removes every AWS variable and config file).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGION = "us-east-1"
ROLES = ("admin", "writer", "reader")

#: the IAM policy of each role (the writer and reader policies are the ones docs/sharing.md gives).
POLICIES: dict[str, list[dict]] = {
    "admin": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    "writer": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::*"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": "arn:aws:s3:::*/*"},
    ],
    "reader": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::*"},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::*/*"},
    ],
}
#: unauthenticated setup calls: per role, create_user + put_user_policy + create_access_key.
SETUP_CALLS = 3 * len(ROLES)


def aws_free_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) without any AWS or fsspec-S3 variable, and with the shared
    config and credentials files pointed at nothing (so ~/.aws cannot interfere)."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("AWS_", "FSSPEC_S3", "BOTO_"))}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    return env


@dataclass(frozen=True)
class Keys:
    """An access key pair."""

    key: str
    secret: str


@dataclass
class S3Server:
    """The running server: its endpoint, the keys of each role, and helpers."""

    endpoint: str
    keys: dict[str, Keys]
    process: subprocess.Popen
    log: Path
    region: str = REGION
    _count: Iterator[int] = field(default_factory=itertools.count)

    # -- credentials, as environment or as fsspec storage options --------------------------------
    def role(self, read_only: bool) -> str:
        return "reader" if read_only else "writer"

    def env(self, read_only: bool = False) -> dict[str, str]:
        """AWS variables that point botocore/s3fs at this server with the writer (or reader) keys."""
        k = self.keys[self.role(read_only)]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": k.key, "AWS_SECRET_ACCESS_KEY": k.secret,
                "AWS_DEFAULT_REGION": self.region}

    def process_env(self, read_only: bool | None = False) -> dict[str, str]:
        """A whole environment for a subprocess: this one without AWS variables, plus ``env(read_only)``
        (``read_only=None``: no AWS variables at all)."""
        env = aws_free_environ()
        if read_only is not None:
            env.update(self.env(read_only))
        return env

    def storage_options(self, read_only: bool = False) -> dict:
        """fsspec/s3fs options carrying the endpoint and keys (for ``--storage-options``)."""
        k = self.keys[self.role(read_only)]
        return {"key": k.key, "secret": k.secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}}

    def apply(self, monkeypatch: pytest.MonkeyPatch, read_only: bool | None = False) -> dict[str, str]:
        """Point ``os.environ`` at the server (``read_only=None``: remove every AWS variable) for the
        rest of the test, and forget cached s3fs instances (they keep the credentials they were
        made with). Returns the AWS variables set."""
        for name in list(os.environ):
            if name.startswith(("AWS_", "FSSPEC_S3", "BOTO_")):
                monkeypatch.delenv(name)
        env = aws_free_environ({})
        if read_only is not None:
            env.update(self.env(read_only))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        self.forget_filesystems()
        return env

    @contextlib.contextmanager
    def environment(self, read_only: bool | None = False) -> Iterator[dict[str, str]]:
        """``apply`` as a context manager (for module- or session-scoped fixtures)."""
        with pytest.MonkeyPatch.context() as mp:
            try:
                yield self.apply(mp, read_only)
            finally:
                self.forget_filesystems()

    @staticmethod
    def forget_filesystems() -> None:
        """Drop fsspec's cached S3 filesystems: the next one reads credentials afresh."""
        try:
            import s3fs
        except ImportError:
            return
        s3fs.S3FileSystem.clear_instance_cache()

    # -- buckets and objects (boto3, independent of diffeat) -------------------------------------
    def client(self, role: str = "admin"):
        """A boto3 S3 client with the keys of ``role``."""
        import boto3

        k = self.keys[role]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=k.key,
                            aws_secret_access_key=k.secret)

    def bucket(self, prefix: str = "diffeat") -> str:
        """Create a fresh, empty bucket and return its name."""
        name = f"{prefix}-{next(self._count)}-{uuid.uuid4().hex[:8]}"
        self.client("admin").create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """``{key: size}`` of every object in ``bucket`` under ``prefix`` (admin keys)."""
        out: dict[str, int] = {}
        pages = self.client("admin").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out


#: the server program: moto's own WSGI app (as ``python -m moto.server`` runs it) behind one lock.
#: moto checks a conditional put (``If-None-Match: *``) and stores the object in two steps with no
#: lock between them, so two concurrent exclusive creates could both succeed; S3 makes them
#: atomic. Serialising requests restores that, for tests of concurrent writers.
SERVER_PROGRAM = """
import sys, threading
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def serialised(environ, start_response):
    with lock:
        return list(app(environ, start_response))

run_simple(sys.argv[1], int(sys.argv[2]), serialised, threaded=True, request_handler=MotoRequestHandler)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port; wait until it answers (retrying if the port was taken)."""
    for _attempt in range(3):
        port = _free_port()
        env = aws_free_environ()
        env.update(INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_CALLS), MOTO_PORT=str(port))
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", SERVER_PROGRAM, "127.0.0.1", str(port)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                    return proc, endpoint
            except OSError:
                time.sleep(0.1)
        _stop(proc)
    raise RuntimeError(f"moto server did not start; its log: {log.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _setup_iam(endpoint: str) -> dict[str, Keys]:
    """The unauthenticated setup calls (exactly SETUP_CALLS of them): one IAM user per role."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    keys = {}
    for role in ROLES:
        user = f"diffeat-{role}"
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=f"{role}-policy",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": POLICIES[role]}))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[role] = Keys(k["AccessKeyId"], k["SecretAccessKey"])
    return keys


def _check_enforced(server: S3Server) -> None:
    """IAM is really enforced from now on: unknown keys are refused, readers cannot write."""
    from botocore.exceptions import ClientError

    bucket = server.bucket("authcheck")
    server.client("writer").put_object(Bucket=bucket, Key="w", Body=b"written by the writer")
    assert server.client("reader").get_object(Bucket=bucket, Key="w")["Body"].read() == b"written by the writer"
    import boto3

    bogus = boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id="AKIABOGUS",
                         aws_secret_access_key="bogus")
    refusals = {
        "unknown key": lambda: bogus.list_objects_v2(Bucket=bucket),
        "reader PutObject": lambda: server.client("reader").put_object(Bucket=bucket, Key="r", Body=b"x"),
        "reader DeleteObject": lambda: server.client("reader").delete_object(Bucket=bucket, Key="w"),
        "writer CreateBucket": lambda: server.client("writer").create_bucket(Bucket=f"{bucket}-w"),
    }
    for what, call in refusals.items():
        try:
            call()
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code not in ("AccessDenied", "InvalidAccessKeyId"):
                raise RuntimeError(f"moto server: {what} failed with {code}, expected AccessDenied") from e
        else:
            raise RuntimeError(f"moto server does not enforce IAM: {what} succeeded")


@pytest.fixture(scope="session")
def s3server(tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server with IAM enforced on 127.0.0.1 (one per session), stopped at the end."""
    pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
    pytest.importorskip("s3fs", reason="s3fs is needed for the S3 tests")
    log = tmp_path_factory.mktemp("s3server") / "moto.log"
    proc, endpoint = _start(log)
    try:
        server = S3Server(endpoint=endpoint, keys=_setup_iam(endpoint), process=proc, log=log)
        _check_enforced(server)
        yield server
    finally:
        S3Server.forget_filesystems()
        _stop(proc)


@pytest.fixture
def s3_bucket(s3server: S3Server) -> str:
    """A fresh, empty bucket on the server (one per test)."""
    return s3server.bucket()


@pytest.fixture
def s3_env(s3server: S3Server, monkeypatch: pytest.MonkeyPatch):
    """``s3_env(read_only=False)``: point os.environ at the server with the writer (True: reader;
    None: no AWS variables at all) keys for the rest of the test; returns the variables set."""
    def apply(read_only: bool | None = False) -> dict[str, str]:
        return s3server.apply(monkeypatch, read_only)

    yield apply
    s3server.forget_filesystems()
