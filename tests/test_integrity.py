"""A store under faults: every byte checksummed, identities checked, damage refused or reported, never silent.

Each test damages a real store the way the fault campaign of issue 16 did (a flipped bit, an
edited attribute, a deleted chunk or ledger, truncated metadata, random bit flips in every
kind of object) and checks that readers refuse it with one line, that ``diffeat verify``
reports it with its path without crashing, and that ``--repair`` rebuilds what it can. The
figures (flips injected and caught) print with ``-s``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from diffeat.cli import main
from diffeat.errors import DiffeatError, StoreError
from diffeat.extract import extract
from diffeat.store import open_store
from diffeat.store.catalog import checksum
from diffeat.store.reader import FeatureStore
from diffeat.store.verify import verify

# 64 rows per split in 16-row chunks: 4 units per setting, one setting per split.
COMMON = {"dataset": "digits", "model": "random:tiny", "blocks": [3], "ts": [90], "limit": 64, "chunk_rows": 16,
          "device": "cpu", "num_workers": 0}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("integrity") / "feats.zarr"
    extract(store=str(store), splits=["train", "test"], **COMMON)
    return store


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the small store for one test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "feats.zarr"))


def setting_dir(store: Path, split: str = "train") -> Path:
    (path,) = store.glob(f"features/*/digits/{split}/block3_*")
    return path


def read(store: Path, split: str = "train", **where) -> tuple:
    f = open_store(str(store)).open_features(dataset="digits", split=split, **({"block": 3, "t": 90, "pool": 1}
                                                                             | where))
    return f.load().tobytes(), f.ids.tolist(), f.labels.tolist(), list(f.class_names), f.info.path


def verify_cli(store: Path, *extra: str):
    result = CliRunner().invoke(main, ["verify", "--store", str(store), *extra])
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, ValueError, TypeError))
    return result


def test_every_array_diffeat_writes_is_checksummed(store):
    arrays = [p for p in store.rglob("zarr.json") if json.loads(p.read_text()).get("node_type") == "array"]
    kinds = {p.parent.name for p in arrays}
    assert kinds == {"data", "done", "sample", "id", "path", "label", "class_name"}
    for meta in arrays:
        codecs = [c["name"] for c in json.loads(meta.read_text())["codecs"]]
        assert codecs[-1] == "crc32c", (meta, codecs)
    for entry in store.glob("_catalog/*.json"):
        doc = json.loads(entry.read_text())
        assert doc["checksum"] == checksum(doc)


def test_a_flipped_label_is_reported_by_verify_and_refused_by_readers(store):
    """Issue 16: a bit flip in a sample table changed three labels and verify exited 0."""
    (chunk,) = store.glob("datasets/digits/train/*/label/c/0")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x20
    chunk.write_bytes(bytes(data))
    result = verify_cli(store)
    assert result.exit_code == 1 and str(chunk.parent.parent.relative_to(store)) in result.output
    with pytest.raises(StoreError, match="sample table .* unreadable"):
        read(store)


def test_an_edited_catalog_entry_never_redirects_a_reader(store):
    """Issue 16: `"block": 3` -> `2` in a catalog entry made probe --block 2 train on block 3's array."""
    digest = setting_dir(store).name.rsplit("_", 1)[-1]
    (entry_path,) = store.glob(f"_catalog/{digest}*.json")
    original = entry_path.read_text()
    entry_path.write_text(original.replace('"block": 3', '"block": 2'))  # checksum no longer matches
    with pytest.raises(StoreError, match="no features for .*block=2"):
        read(store, block=2)
    assert read(store)[4].endswith("/data")  # block 3 is still found, from the array's own attributes
    result = verify_cli(store)
    assert result.exit_code == 1 and entry_path.name in result.output and "checksum" in result.output

    # The same edit with its checksum made to match (a deliberate edit): the array's attributes still win.
    doc = json.loads(original)
    doc["setting"]["block"] = 2
    doc["checksum"] = checksum(doc)
    entry_path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="cannot be trusted: the catalog lists it as b2/t90/p1"):
        read(store, block=2)
    assert verify_cli(store).exit_code == 1

    # A flipped key makes the entry unusable: listing falls back to the arrays, nothing crashes.
    entry_path.write_text(original.replace('"dtype"', '"dt9pe"'))
    assert {s.block for s in open_store(str(store)).list_settings()} == {3}
    assert CliRunner().invoke(main, ["ls", "--store", str(store), "--json"]).exit_code == 0
    assert verify_cli(store).exit_code == 1
    assert verify_cli(store, "--repair").exit_code == 1
    assert verify_cli(store).exit_code == 0  # the entry was rewritten from the array


def test_a_hand_edited_setting_is_refused_and_reported(store):
    """Issue 16: `setting.t` 90 -> 50 in the attributes passed verify and was found under the wrong t."""
    array = zarr.open_array(store=str(store), path=str((setting_dir(store) / "data").relative_to(store)), mode="r+")
    meta = dict(array.attrs)["diffeat"]
    meta["setting"]["t"] = 50
    array.attrs["diffeat"] = meta
    with pytest.raises(StoreError, match="cannot be trusted"):
        read(store)
    result = verify_cli(store)
    assert result.exit_code == 1 and "setting.t is 50 but the recorded settings say 90" in result.output


def test_lost_rows_are_refused_with_the_way_to_repair(store):
    """Issue 16: deleting a chunk and its ledger flag made a knn probe drop from 45% to 7% without a word."""
    setting = setting_dir(store)
    (setting / "data/c/1/0/0/0").unlink()
    with pytest.raises(StoreError, match=r"rows \[16, 17, 18, 19, 20\] .*missing .*verify --repair"):
        read(store)
    (setting / "done/c/1").unlink()
    with pytest.raises(StoreError, match="1 of 4 units are not flagged done.*verify --repair"):
        read(store)
    result = verify_cli(store, "--repair")
    assert result.exit_code == 1 and "repaired" in result.output
    again = extract(store=str(store), splits=["train"], **COMMON)
    assert [(s.outcome, s.units_written) for s in again.settings] == [("resumed", 1)]
    assert verify_cli(store).exit_code == 0 and read(store)


def test_verify_reports_damaged_metadata_with_its_path_and_goes_on(store):
    """Issue 16: a truncated zarr.json or `"shape"` -> `"Shape"` in done/zarr.json ended verify in a traceback."""
    train, test = setting_dir(store, "train"), setting_dir(store, "test")
    data_meta = train / "data/zarr.json"
    data_meta.write_bytes(data_meta.read_bytes()[:100])
    done_meta = test / "done/zarr.json"
    done_meta.write_text(done_meta.read_text().replace('"shape"', '"Shape"'))
    root = store / "zarr.json"
    root.write_bytes(root.read_bytes()[:20])
    result = verify_cli(store, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    text = json.dumps(report)
    for damaged in (data_meta, done_meta, root):
        assert str(damaged.relative_to(store)) in text, damaged
    assert {s["path"] for s in report["settings"]} == {str((d / "data").relative_to(store)) for d in (train, test)}
    with pytest.raises(StoreError, match="root metadata .* unreadable"):
        open_store(str(store))
    repaired = verify_cli(store, "--repair")
    assert repaired.exit_code == 1
    assert open_store(str(store)).list_settings()  # the root and the ledger were rebuilt
    assert read(store, "test")
    with pytest.raises(StoreError, match="metadata is missing or unreadable"):
        read(store, "train")  # an array's metadata cannot be rebuilt: refused, not guessed


def test_repair_rebuilds_a_deleted_ledger_without_recomputing(store):
    """Issue 16: a deleted ledger of a complete setting gave ArrayNotFoundError in verify and extract."""
    reference = read(store)
    shutil.rmtree(setting_dir(store) / "done")
    with pytest.raises(StoreError, match="ledger"):
        read(store)
    result = verify_cli(store)
    assert result.exit_code == 1 and "ledger missing" in result.output
    assert verify_cli(store, "--repair").exit_code == 1
    assert verify_cli(store).exit_code == 0
    assert read(store) == reference
    again = extract(store=str(store), splits=["train"], **COMMON)
    assert [s.outcome for s in again.settings] == ["cached"]  # every unit read back whole: flags rebuilt


def test_repair_sets_a_deleted_flag_again_when_its_unit_is_whole(store):
    reference = read(store)
    (setting_dir(store) / "done/c/2").unlink()
    with pytest.raises(StoreError, match="1 of 4 units are not flagged done"):
        read(store)
    assert verify_cli(store, "--repair").exit_code == 1
    assert verify_cli(store).exit_code == 0 and read(store) == reference


def test_extract_rebuilds_a_deleted_ledger(store):
    shutil.rmtree(setting_dir(store) / "done")
    meta_path = setting_dir(store) / "data"
    array = zarr.open_array(store=str(store), path=str(meta_path.relative_to(store)), mode="r+")
    meta = dict(array.attrs)["diffeat"]
    meta["status"] = "in_progress"
    array.attrs["diffeat"] = meta
    again = extract(store=str(store), splits=["train"], **COMMON)
    assert [s.outcome for s in again.settings] == ["written"]  # recomputed whole, no traceback


def test_claims_left_on_finished_settings_are_cleaned(store):
    """Issue 16: claims stayed in finished stores after kill/resume (flag set, then killed before release)."""
    digest = setting_dir(store).name.rsplit("_", 1)[-1]
    (full,) = {e.stem for e in store.glob(f"_catalog/{digest}*.json")}
    stale = store / "_claims" / full / "2.0"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(json.dumps({"unit": "2", "owner": "killed", "host": "elsewhere", "pid": 1, "user": "x",
                                 "expires": time.time() + 600}))
    result = verify_cli(store)
    assert result.exit_code == 1 and "claim objects left on a finished setting" in result.output
    extract(store=str(store), splits=["train"], **COMMON)  # cached: opening a finished setting cleans up
    assert not stale.exists()


def test_a_renewal_racing_a_release_leaves_no_claim(tmp_path):
    """With short leases the renewer created the next generation just after release() had deleted the others,
    leaving a claim in a finished store. The release is made to land between renew()'s snapshot of the held
    units and its create (the interleaving the renewer thread hits)."""
    from diffeat.store.claims import Claims
    from diffeat.store.objects import ObjectStore

    objects = ObjectStore(str(tmp_path / "s.zarr"))
    claims = Claims(objects, "h", lease=60)
    create = objects.create
    for round_ in range(20):
        unit = str(round_)
        assert claims.try_claim([unit]) == [unit]

        def create_after_release(key, data, unit=unit):
            claims.release(unit)
            return create(key, data)

        objects.create = create_after_release
        try:
            claims.renew()
        finally:
            objects.create = create
    assert objects.list("_claims") == {}


# -- random bit flips in every kind of object ----------------------------------------------------

KINDS = {
    "features": "features/*/*/*/*/data/c/*/*/*/*",
    "ledger": "features/*/*/*/*/done/c/*",
    "sample tables": "datasets/*/*/*/*/c/*",
    "coordinates": "features/*/*/*/*/sample/c/*",
    "catalog": "_catalog/*.json",
    "metadata": "**/zarr.json",
}
FLIPS_PER_KIND = 40


def _everything(store: Path) -> list:
    fs = open_store(str(store))
    out: list = [sorted((s.path, s.block, s.t, s.pool, s.status) for s in fs.list_settings())]
    for split in ("train", "test"):
        out.append(read(store, split))
    return out


def test_random_bit_flips_are_never_silent_and_never_crash(store):
    """Every flip is harmless, reported by verify with its path, or refused by the reader."""
    import logging

    reference = _everything(store)
    rng = random.Random(16)
    tally: dict[str, dict[str, int]] = {}
    logging.disable(logging.WARNING)
    try:
        for kind, pattern in KINDS.items():
            files = sorted(p for p in store.glob(pattern) if p.stat().st_size)
            assert files, kind
            for _ in range(FLIPS_PER_KIND):
                path = rng.choice(files)
                data = path.read_bytes()
                flipped = bytearray(data)
                flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                path.write_bytes(bytes(flipped))
                try:
                    outcome = _flip_outcome(store, path, reference)
                finally:
                    path.write_bytes(data)
                tally.setdefault(kind, {}).setdefault(outcome, 0)
                tally[kind][outcome] += 1
    finally:
        logging.disable(logging.NOTSET)
    total = sum(sum(t.values()) for t in tally.values())
    caught = sum(n for t in tally.values() for o, n in t.items() if o != "harmless")
    print(f"\nbit flips: {total} injected, {caught} reported or refused, "
          f"{total - caught} harmless (same values read), 0 silent, 0 crashes: {tally}")
    assert total == len(KINDS) * FLIPS_PER_KIND
    for kind in ("features", "ledger", "sample tables", "coordinates"):  # checksummed: every flip is caught
        assert tally[kind].get("harmless", 0) == 0, tally[kind]


def _flip_outcome(store: Path, path: Path, reference: list) -> str:
    """``reported``, ``refused``, ``reported+refused`` or ``harmless``; fails the test if silent or a crash."""
    key = str(path.relative_to(store))
    report = verify(FeatureStore(str(store), damaged_ok=True))  # any exception here is a crash: test fails
    text = json.dumps(report.as_dict())
    reported = not report.ok
    if reported:
        owners = [key, key.split("/data/")[0], key.split("/done/")[0], "/".join(key.split("/")[:4])]
        assert any(o in text for o in owners), f"{key}: verify did not name it: {text[:400]}"
    try:
        same = _everything(store) == reference
        refused = False
    except DiffeatError:
        same, refused = False, True
    assert same or refused or reported, f"SILENT: a flip in {key} changed what readers get and verify saw nothing"
    return "+".join(w for w, on in (("reported", reported), ("refused", refused)) if on) or "harmless"


# -- many writers: objects vanish between a listing and a read ------------------------------------

def _claim_churn(location: str, worker: int, seconds: float, units: int) -> int:
    """One writer's loop: claim free units, 'write' them (a flag object), release; list all the time."""
    from diffeat.store.claims import Claims
    from diffeat.store.objects import ObjectStore

    objects = ObjectStore(location)
    deadline = time.monotonic() + seconds
    cycles = 0
    while time.monotonic() < deadline:
        claims = Claims(objects, "stress", owner=f"w{worker}-{cycles}", lease=60)
        won = claims.try_claim([str(u) for u in range(units)])  # lists, reads, creates
        for unit in won:
            objects.put(f"flags/{worker}/{unit}", b"1")
            claims.release(unit)  # deletes: other writers' listings see it vanish
        objects.list("_claims")
        objects.list("flags")
        cycles += 1
    return cycles


def test_four_writers_listing_while_others_delete_never_fail(tmp_path):
    """Issue 16: a claim listed by one writer and deleted by another before its size was read killed the first
    (FileNotFoundError in ObjectStore.list, 2 of 6 runs of 2-3 writers). Four writer processes churn claims on
    one store for a bounded time, in several rounds; any such error fails the test."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    location = str(tmp_path / "stress.zarr")
    total = 0
    with ctx.Pool(4) as pool:
        for round_ in range(2):
            runs = [pool.apply_async(_claim_churn, (location, w, 2.0, 8)) for w in range(4)]
            total += sum(r.get(timeout=120) for r in runs)
    assert total > 0
    print(f"\nstress: 4 writers, {total} claim/release rounds over 2 rounds of 2 s, 0 errors")


pytest_plugins = ["s3server"]


def test_listing_while_others_delete_on_s3(s3server, s3_bucket, s3_env):
    """The same churn against an S3 API server: listings and reads of vanished objects are tolerated."""
    from concurrent.futures import ThreadPoolExecutor

    s3_env(read_only=False)
    location = f"s3://{s3_bucket}/stress.zarr"
    with ThreadPoolExecutor(3) as pool:
        cycles = list(pool.map(lambda w: _claim_churn(location, w, 2.0, 4), range(3)))
    assert sum(cycles) > 0


def test_four_extract_writers_with_many_short_units(tmp_path):
    """Four `diffeat extract` processes on one store, 2 x 360 four-row units: every unit written once, the same
    bytes as one writer, no claim left. (How the units split between the writers depends on when each
    process starts; the claim churn above is the test that does not.)"""
    import subprocess
    import sys

    args = ["--dataset", "digits", "--model", "random:tiny", "--block", "3", "--t", "50,90", "--split", "train",
            "--chunk-rows", "4", "--device", "cpu", "--batch-size", "8", "--num-workers", "0"]
    single = str(tmp_path / "single.zarr")
    shared = str(tmp_path / "shared.zarr")
    assert subprocess.run([sys.executable, "-m", "diffeat", "-q", "extract", *args, "--store", single],
                          capture_output=True, timeout=300, check=False).returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "diffeat", "-q", "extract", *args, "--store", shared, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    written = [sum(s["units_written"] for s in json.loads(out)["settings"]) for out, _ in outs]
    assert sum(written) == 2 * 360, written
    paths = [s.path for s in open_store(single).list_settings()]
    assert len(paths) == 2
    for path in paths:
        a = np.asarray(zarr.open_array(store=single, path=path, mode="r")[:])
        b = np.asarray(zarr.open_array(store=shared, path=path, mode="r")[:])
        assert a.tobytes() == b.tobytes()
    assert not list(Path(shared).glob("_claims/*/*"))
    print(f"\n4 writers x 720 four-row units: units written {written}, bitwise equal to one writer")
