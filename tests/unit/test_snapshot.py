"""Index snapshots: atomic files that verify, and a restart that trusts them only where the store agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.reference import ReferenceMEDS
from meds_service.core.types import Group, KeyRows, MemoryKey, Snapshot
from meds_service.engine import ErrorMemory
from meds_service.storage.index import ShardIndexes
from meds_service.storage.snapshot import SnapshotFolder, read_snapshot, snapshot_path, write_snapshot
from meds_service.storage.sqlite import SQLiteStore
from meds_service.workers import LocalRefitter
from tests.unit.test_engine import grid_trace, replay


def sample() -> Snapshot:
    rng = np.random.default_rng(0)
    keys = [KeyRows(MemoryKey(f"p{i}", Group(i % 3)), i, i + 5, rng.standard_normal((5, 4)).astype(np.float32))
            for i in range(4)]  # fmt: skip
    return Snapshot("run", 123.5, 4, keys)


def test_roundtrip(tmp_path: Path) -> None:
    written = sample()
    write_snapshot(tmp_path, written)
    read = read_snapshot(tmp_path, "run")
    assert read is not None and (read.run, read.created_at, read.dim) == ("run", 123.5, 4)
    for a, b in zip(read.keys, written.keys, strict=True):
        assert (a.key, a.start, a.n) == (b.key, b.start, b.n) and np.array_equal(a.rows, b.rows)
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary file was renamed into place
    assert read_snapshot(tmp_path, "other") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_snapshots_are_refused(tmp_path: Path, damage: str) -> None:
    path = write_snapshot(tmp_path, sample())
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) - 40]
    elif damage == "garbage":
        blob = bytearray(b"MEDSIDX1" + b"\x00" * 100)
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    assert read_snapshot(tmp_path, "run") is None


def engine_at(folder: Path) -> tuple[ErrorMemory, SQLiteStore, LocalRefitter]:
    store = SQLiteStore(folder / "data")
    refitter = LocalRefitter(store.spec(), 1, processes=False)
    engine = ErrorMemory(store, refitter, indexes=ShardIndexes(), snapshots=SnapshotFolder(folder / "snapshots"))
    engine.load()
    return engine, store, refitter


@pytest.mark.parametrize("snapshot", ["current", "stale", "corrupt", "foreign", "ahead"])
def test_restart_from_any_snapshot_continues_exactly(tmp_path: Path, snapshot: str) -> None:
    reference = ReferenceMEDS(max_memory_per_key=7)
    steps = list(grid_trace(21, 12))
    engine, store, refitter = engine_at(tmp_path)
    engine.put_config("r", {"max_memory_per_key": 7})
    replay(engine, "r", reference, iter(steps[:4]), 3)
    assert engine.write_snapshots() == 1 and engine.write_snapshots() == 0  # nothing changed since
    replay(engine, "r", reference, iter(steps[4:6]), 3)
    if snapshot != "stale":
        assert engine.write_snapshots() == 1
    path = snapshot_path(tmp_path / "snapshots", "r")
    if snapshot == "corrupt":
        path.write_bytes(path.read_bytes()[:-10])
    if snapshot == "foreign":  # another incarnation of the run (deleted and created again)
        old = read_snapshot(tmp_path / "snapshots", "r")
        assert old is not None
        write_snapshot(tmp_path / "snapshots", Snapshot("r", old.created_at + 1, old.dim, old.keys))
    if snapshot == "ahead":  # the snapshot claims vectors the store does not have
        old = read_snapshot(tmp_path / "snapshots", "r")
        assert old is not None
        bumped = [KeyRows(k.key, k.start, k.n + 1, np.vstack([k.rows, k.rows[-1:]])) for k in old.keys]
        write_snapshot(tmp_path / "snapshots", Snapshot("r", old.created_at, old.dim, bumped))
    stats = engine.stats("r")
    refitter.close()
    store.close()

    engine, store, refitter = engine_at(tmp_path)
    assert engine.stats("r") == stats
    replay(engine, "r", reference, iter(steps[6:]), 3)
    refitter.close()
    store.close()
