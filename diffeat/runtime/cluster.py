"""A dask.distributed client from ``--scheduler ADDRESS`` or ``--workers N``: shared by extract and cka.

::

    with cluster_client(scheduler, workers) as client:   # client is None when neither is given
        ...

* ``scheduler``: the address of a running scheduler (``tcp://10.0.0.1:8786``, ``10.0.0.1:8786``,
  ``10.0.0.1`` (port 8786), ``tls://...``) or the path of a scheduler file (``dask scheduler
  --scheduler-file``). The client connects to it and leaves it running when it is done.
* ``workers``: a ``LocalCluster`` of that many worker *processes* with one thread each, started
  for the block and closed after it. With ``resources`` asking for a GPU (``{"GPU": 1}``) and
  ``dask_cuda`` installed, a ``LocalCUDACluster`` (one GPU per worker) is started instead.

Every mistake a user can make (both options, ``N < 1``, a malformed address, a scheduler nobody
answers at within ``connect_timeout`` seconds) is a one-line :class:`~diffeat.errors.DiffeatError`.
``distributed`` is imported only when a cluster is asked for, so ``diffeat --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from diffeat.errors import DiffeatError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8786
CONNECT_TIMEOUT = 10.0
SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")
GPU_RESOURCES = ("gpu", "cuda")  # resource names (any case) that ask for a GPU per task
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)$")


def check_cluster_options(scheduler: str | None, workers: int | None) -> None:
    """Raise a ``DiffeatError`` for ``--scheduler`` together with ``--workers``, or ``--workers`` below 1."""
    if scheduler is not None and workers is not None:
        raise DiffeatError("give --scheduler ADDRESS (a running dask cluster) or --workers N (a local one), "
                           "not both")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise DiffeatError(f"--workers {workers!r} is invalid: it must be a whole number of worker processes >= 1")
    if scheduler is not None and not str(scheduler).strip():
        raise DiffeatError("--scheduler is empty: give a scheduler address such as tcp://10.0.0.1:8786")


def _scheduler_file_address(path: str) -> str:
    """The address written in a ``dask scheduler --scheduler-file`` JSON file."""
    try:
        with open(path) as f:
            address = json.load(f)["address"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DiffeatError(f"--scheduler {path}: not a dask scheduler file with an 'address' ({e})") from None
    return str(address)


def normalize_address(scheduler: str) -> str:
    """``scheme://host:port`` for a scheduler address, or a ``DiffeatError`` saying what is wrong with it.

    A missing scheme means ``tcp``, a missing port 8786 (the ``dask scheduler`` default).
    """
    text = str(scheduler).strip()
    scheme, sep, loc = text.partition("://")
    if not sep:
        scheme, loc = "tcp", text
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise DiffeatError(f"--scheduler {scheduler!r}: unknown scheme {scheme!r} (use e.g. tcp://HOST:8786; "
                           f"known: {', '.join(SCHEMES)})")
    if scheme == "inproc":
        return f"inproc://{loc}"
    host, port = loc, str(DEFAULT_PORT)
    if loc.startswith("["):  # [IPv6]:port
        end = loc.find("]")
        host, rest = loc[:end + 1], loc[end + 1:]
        if rest:
            if not rest.startswith(":"):
                host = ""
            port = rest[1:]
    elif ":" in loc:
        host, _, port = loc.rpartition(":")
    if not host or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise DiffeatError(f"--scheduler {scheduler!r} is not a scheduler address: use tcp://HOST:PORT, "
                           "e.g. tcp://10.0.0.1:8786 (the address `dask scheduler` prints)")
    return f"{scheme}://{host}:{int(port)}"


def _probe_tcp(address: str, timeout: float) -> None:
    """Fail fast (connection refused, unknown host) before dask's retrying connect."""
    host, _, port = address.split("://", 1)[1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except socket.gaierror as e:
        raise DiffeatError(f"cannot reach the dask scheduler at {address}: unknown host {host!r} ({e})") from None
    except TimeoutError:
        raise DiffeatError(f"cannot reach the dask scheduler at {address}: no answer within {timeout:g} s "
                           "(is `dask scheduler` running there, and the port open?)") from None
    except OSError as e:
        raise DiffeatError(f"cannot reach the dask scheduler at {address}: {e.strerror or e} "
                           "(is `dask scheduler` running there?)") from None


def wants_gpu(resources: dict | None) -> bool:
    """Whether ``resources`` asks for a GPU per task (a ``GPU``/``CUDA`` resource)."""
    return any(str(k).lower() in GPU_RESOURCES for k in (resources or {}))


def describe(client: Any) -> dict:
    """``{"scheduler": address, "workers": n, "threads": t, "memory_limit": min bytes per worker or 0}``."""
    info = client.scheduler_info()
    workers = info.get("workers", {})
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    return {"scheduler": info.get("address") or str(getattr(client.scheduler, "address", "")),
            "workers": len(workers), "threads": sum(int(w.get("nthreads", 1)) for w in workers.values()),
            "memory_limit": min(limits) if limits and all(limits) else 0}


def _connect(scheduler: str, resources: dict | None, timeout: float):
    from distributed import Client

    if os.path.isfile(scheduler):
        address = normalize_address(_scheduler_file_address(scheduler))
    else:
        address = normalize_address(scheduler)
    if address.startswith(("tcp://", "tls://")):
        _probe_tcp(address, timeout)
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise DiffeatError(f"cannot connect to the dask scheduler at {address}: {e}") from None
    except ValueError as e:  # distributed's own address parsing
        raise DiffeatError(f"--scheduler {scheduler!r}: {e}") from None
    info = describe(client)
    if not info["workers"]:
        logger.warning("dask scheduler %s has no workers yet: tasks wait until workers join", address)
    if resources:
        have = client.scheduler_info().get("workers", {}).values()
        for name, amount in resources.items():
            if not any(float(w.get("resources", {}).get(name, 0)) >= float(amount) for w in have):
                logger.warning("no worker of %s offers resource %s=%s yet (start workers with "
                               "`dask worker %s --resources %s=%s`): tasks that need it wait", address, name,
                               amount, address, name, amount)
    logger.info("dask cluster %s: %d workers, %d threads", address, info["workers"], info["threads"])
    return client


def _local_cluster(workers: int, resources: dict | None, options: dict):
    with warnings.catch_warnings():
        # Without a dashboard the scheduler still serves /health on 8787, or on any free port when
        # that one is taken (another cluster on this machine): not worth a warning.
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        return _start_local_cluster(workers, resources, options)


def _start_local_cluster(workers: int, resources: dict | None, options: dict):
    from distributed import LocalCluster

    kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
    if resources:
        kwargs["resources"] = dict(resources)
    if wants_gpu(resources):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            logger.warning("--workers %d on a GPU without dask-cuda: a plain LocalCluster whose workers all use "
                           "the default GPU; `pip install dask-cuda` gives one GPU per worker", workers)
        else:
            logger.info("starting a LocalCUDACluster of %d GPU worker(s)", workers)
            try:
                return LocalCUDACluster(**{**kwargs, **options})
            except ValueError as e:
                raise DiffeatError(f"--workers {workers}: {e}") from None
    logger.info("starting a local dask cluster: %d worker processes, 1 thread each", workers)
    return LocalCluster(**{**kwargs, "processes": True, **options})


@contextmanager
def cluster_client(scheduler: str | None = None, workers: int | None = None, *, resources: dict | None = None,
                   connect_timeout: float = CONNECT_TIMEOUT, **cluster_options: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for ``--scheduler``/``--workers``, or ``None`` when neither is given.

    Args:
        scheduler: address of a running scheduler, or the path of its scheduler file.
        workers: start a ``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)``
            for the block and close it afterwards.
        resources: abstract resources every local worker offers (e.g. ``{"GPU": 1}``), for tasks
            submitted with ``resources=``; asking for a GPU starts a ``LocalCUDACluster`` when
            ``dask_cuda`` is installed. With ``scheduler``, the workers must have been started with
            them (a warning says when none has).
        connect_timeout: seconds to wait for a scheduler to answer.
        cluster_options: more ``LocalCluster`` keywords (``memory_limit``, ``dashboard_address``, ...).

    Inside the block the client is dask's default scheduler (``dask.compute`` runs on the
    cluster), as with ``with Client(...)``; both the client and a local cluster are closed on exit
    (a remote scheduler and its workers keep running).
    """
    check_cluster_options(scheduler, workers)
    if scheduler is None and workers is None:
        yield None
        return
    from distributed import Client

    with ExitStack() as stack:
        if not logger.isEnabledFor(logging.DEBUG):  # dask's per-worker INFO lines drown diffeat's own (-vv: keep)
            chatty = logging.getLogger("distributed")
            stack.callback(chatty.setLevel, chatty.level)
            chatty.setLevel(max(logging.WARNING, chatty.getEffectiveLevel()))
        if scheduler is not None:
            client = stack.enter_context(_connect(str(scheduler), resources, connect_timeout))
        else:
            cluster = stack.enter_context(_local_cluster(int(workers), resources, cluster_options))
            client = stack.enter_context(Client(cluster))
        yield client
