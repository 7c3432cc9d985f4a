"""Claims with expiry (diffeat.store.claims) on a real directory: exclusive, renewable, taken over."""

from __future__ import annotations

import json
import time

import numpy as np

from diffeat.extract import extract
from diffeat.store import open_store
from diffeat.store.claims import Claims
from diffeat.store.objects import ObjectStore


def foreign_claim(objects: ObjectStore, prefix: str, unit: str, gen: int, expires_in: float) -> None:
    """A claim written by a writer on another machine (its pid cannot be checked from here)."""
    record = {"unit": unit, "owner": "elsewhere", "host": "other-host", "pid": 1, "user": "ana",
              "expires": time.time() + expires_in}
    assert objects.create(f"{prefix}/{unit}.{gen}", json.dumps(record).encode())


def test_exactly_one_writer_wins_each_generation(tmp_path):
    objects = ObjectStore(str(tmp_path / "s.zarr"))
    a, b = Claims(objects, "h", lease=60), Claims(objects, "h", lease=60)
    assert a.try_claim(["0", "1"]) == ["0", "1"]
    assert b.try_claim(["0", "1", "2"]) == ["2"]  # live claims are respected
    a.renew()  # the owner extends its claims by creating the next generation
    assert a.held == {"0": 1, "1": 1}
    assert b.try_claim(["0"]) == []
    a.release("0")
    assert "0" not in a.current()


def test_a_live_claim_from_another_host_blocks_until_it_expires(tmp_path):
    objects = ObjectStore(str(tmp_path / "s.zarr"))
    foreign_claim(objects, "_claims/h", "3", 0, expires_in=1.0)
    mine = Claims(objects, "h", lease=60)
    assert mine.try_claim(["3"]) == []
    time.sleep(1.1)
    assert mine.try_claim(["3"]) == ["3"]
    assert mine.current()["3"].generation == 1 and mine.current()["3"].owner == mine.owner


def test_a_dead_local_process_claim_is_taken_over_at_once(tmp_path):
    import platform
    import subprocess
    import sys

    objects = ObjectStore(str(tmp_path / "s.zarr"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    record = {"unit": "0", "owner": "dead", "host": platform.node(), "pid": int(gone), "user": "me",
              "expires": time.time() + 3600}
    objects.create("_claims/h/0.0", json.dumps(record).encode())
    assert Claims(objects, "h").try_claim(["0"]) == ["0"]


def test_no_wait_leaves_units_another_writer_holds(tmp_path):
    """A unit claimed by a live writer elsewhere: --no-wait returns incomplete, then the claim expires and
    a second run takes the unit over and completes the setting."""
    store = str(tmp_path / "s.zarr")
    common = dict(dataset="digits", model="random:tiny", blocks=[3], ts=[90], splits=["test"], limit=64,
                  chunk_rows=16, device="cpu", num_workers=0)
    first = extract(store=store, **common, wait=False)
    assert [s.outcome for s in first.settings] == ["written"]
    (info,) = open_store(store).list_settings()
    fs = open_store(store, mode="a")
    group = info.path.rsplit("/", 1)[0]
    fs.objects.delete(f"{group}/done/c/2")  # unit 2 must be written again ...
    meta = dict(fs.root[info.path].attrs)["diffeat"]
    meta["status"] = "in_progress"
    fs.root[info.path].attrs["diffeat"] = meta
    foreign_claim(fs.objects, f"_claims/{info.settings_hash}", "2", 0, expires_in=2.0)  # ... but is held
    held = extract(store=store, **common, wait=False)
    assert [(s.outcome, s.units_written) for s in held.settings] == [("incomplete", 0)]
    took = extract(store=store, **common)  # waits for the claim to expire, then takes it over
    assert [(s.outcome, s.units_written) for s in took.settings] == [("resumed", 1)]
    values = np.asarray(open_store(store).open_features(dataset="digits", split="test", block=3, t=90,
                                                        pool=1).load())
    assert not np.isnan(values).any()
