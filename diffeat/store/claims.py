"""Claims with expiry: which writer computes which unit of a shared setting.

Several ``diffeat extract`` processes (team members, GPUs, dask workers) may work on
one store at once. Before computing a unit a writer *claims* it by exclusively
creating the object ``_claims/<settings_hash>/<unit>.<generation>``; exactly one
writer wins each generation (``ObjectStore.create``). A claim holds its owner and an
expiry time:

* the owner renews it before it expires by creating the next generation itself;
* anyone may take over an expired claim, again by creating the next generation, so a
  writer that died (SIGKILL, lost machine) only delays its units by one lease;
* on the owner's own host a claim whose process is gone counts as expired at once,
  so a killed run resumes immediately on the same machine.

A claim is an optimisation of *who* writes, not what is written: units are whole chunk
or shard objects with deterministic values, so even two writers that both believed
they held a unit (clock skew beyond the lease) would write the same bytes on CPU.
Expiry uses wall-clock time: machines sharing a store need synchronised clocks (NTP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from diffeat.errors import StoreError
from diffeat.store.objects import ObjectStore

logger = logging.getLogger(__name__)

LEASE_SECONDS = float(os.environ.get("DIFFEAT_CLAIM_LEASE", "600"))
CREATE = "create"  # the pseudo-unit claimed by whoever creates a setting's arrays


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """One generation of a claim on one unit."""

    unit: str
    generation: int
    owner: str
    host: str
    pid: int
    user: str
    expires: float

    def expired(self, now: float | None = None) -> bool:
        """Past its expiry, or its process is gone from this very host."""
        if (now or time.time()) >= self.expires:
            return True
        return self.host == platform.node() and not _pid_alive(self.pid)

    def describe(self) -> str:
        """``user@host pid N`` for log lines."""
        return f"{self.user}@{self.host} pid {self.pid}"


class Claims:
    """The claims of one writer on one setting (identified by its settings hash)."""

    def __init__(self, objects: ObjectStore, settings_hash: str, *, owner: str | None = None,
                 lease: float | None = None):
        self.objects = objects
        self.prefix = f"_claims/{settings_hash}"
        self.owner = owner or uuid.uuid4().hex
        self.lease = LEASE_SECONDS if lease is None else lease
        self.held: dict[str, int] = {}  # unit -> generation this writer holds
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------
    def current(self) -> dict[str, Claim]:
        """The latest claim of every unit that has one (one listing, then the latest objects)."""
        latest: dict[str, int] = {}
        for key in self.objects.list(self.prefix):
            unit, _, gen = key.rsplit("/", 1)[-1].rpartition(".")
            if unit and gen.isdigit():
                latest[unit] = max(latest.get(unit, -1), int(gen))
        keys = {f"{self.prefix}/{u}.{g}": u for u, g in latest.items()}
        out = {}
        for key, data in self.objects.get_many(list(keys)).items():
            claim = _parse(keys[key], latest[keys[key]], data)
            if claim is not None:
                out[claim.unit] = claim
        # A generation whose object could not be read (torn, foreign) is treated as expired.
        for u, g in latest.items():
            out.setdefault(u, Claim(u, g, "", "", 0, "", 0.0))
        return out

    # -- claiming -----------------------------------------------------------------------------
    def _record(self, unit: str) -> bytes:
        try:
            import getpass

            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return json.dumps({"unit": unit, "owner": self.owner, "host": platform.node(), "pid": os.getpid(),
                           "user": user, "expires": time.time() + self.lease}).encode()

    def try_claim(self, units: list[str], current: dict[str, Claim] | None = None) -> list[str]:
        """Claim every unit of ``units`` that is free or expired; return the ones this writer now holds."""
        current = self.current() if current is None else current
        won, new = [], []
        try:
            for unit in units:
                c = current.get(unit)
                if c is not None and c.owner == self.owner:
                    won.append(unit)
                    continue
                if c is not None and not c.expired():
                    continue
                gen = 0 if c is None else c.generation + 1
                if self.objects.create(f"{self.prefix}/{unit}.{gen}", self._record(unit)):
                    if c is not None and c.owner:
                        logger.info("took over unit %s of %s from %s (claim expired)", unit, self.prefix,
                                    c.describe())
                    with self._lock:
                        self.held[unit] = gen
                    won.append(unit)
                    new.append(unit)
        except BaseException:
            for unit in new:  # a failed create (a full disk) must not leave the claims won so far behind
                with contextlib.suppress(Exception):
                    self.release(unit)
            raise
        return won

    def create_once(self, exists: Callable[[], bool], create: Callable[[], None], what: str) -> None:
        """Make sure something exists, created by exactly one of the writers that need it.

        The winner of the pseudo-unit ``create`` runs ``create``; the others wait until
        ``exists()`` (or take over once the winner's claim expires, if it died).
        """
        deadline = time.monotonic() + self.lease
        while not exists():
            if self.try_claim([CREATE]):
                try:
                    if not exists():
                        create()
                finally:
                    self.release(CREATE)
                return
            if time.monotonic() > deadline:
                raise StoreError(f"{what}: another writer has been creating it for {self.lease:.0f} s")
            time.sleep(0.2)

    def renew(self) -> None:
        """Extend every held claim by one lease (creating the next generation); drop lost ones."""
        with self._lock:
            held = dict(self.held)
        for unit, gen in held.items():
            key = f"{self.prefix}/{unit}.{gen + 1}"
            if self.objects.create(key, self._record(unit)):
                with self._lock:
                    released = self.held.get(unit) != gen
                    if not released:
                        self.held[unit] = gen + 1
                if released:
                    # The unit was released (or renewed) while this generation was being created:
                    # release() only deleted up to the generation it knew, so this one is ours to remove.
                    self.objects.delete(key)
            else:
                logger.warning("lost the claim on unit %s of %s (another writer took it over)", unit, self.prefix)
                with self._lock:
                    self.held.pop(unit, None)

    def release(self, unit: str) -> None:
        """Forget a unit that is done: remove every generation of its claim."""
        with self._lock:
            gen = self.held.pop(unit, None)
        for g in range(0 if gen is None else gen + 1):
            self.objects.delete(f"{self.prefix}/{unit}.{g}")


def _parse(unit: str, generation: int, data: bytes) -> Claim | None:
    try:
        d = json.loads(data)
        return Claim(unit, generation, str(d["owner"]), str(d["host"]), int(d["pid"]), str(d.get("user", "")),
                     float(d["expires"]))
    except (ValueError, KeyError, TypeError):
        return None


class Renewer:
    """A daemon thread that renews a writer's claims every third of a lease."""

    def __init__(self, claims: list[Claims]):
        self.claims = claims
        self._stop = threading.Event()
        lease = min((c.lease for c in claims), default=LEASE_SECONDS)
        self._thread = threading.Thread(target=self._run, args=(lease / 3,), name="diffeat-claims", daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            for c in self.claims:
                try:
                    c.renew()
                except Exception as e:  # noqa: BLE001 - a failed renewal must not kill the run
                    logger.warning("could not renew claims under %s: %s", c.prefix, e)
