"""SQLite specifics: one writer per folder, read-only worker views, errors become StoreUnavailable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from meds_service.core.config import RunConfig
from meds_service.core.errors import StoreUnavailable
from meds_service.core.records import StoreSpec
from meds_service.core.types import (
    Group,
    KeyAppend,
    MemoryKey,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
)
from meds_service.storage import open_store
from meds_service.storage.sqlite import SQLiteStore
from meds_service.workers import refit_job
from tests.support.records import result_records


def result(rid: str) -> RolloutResult:
    return RolloutResult(rid, RolloutStatus.SCORED, None, 0, 0.0, None)


def test_one_writer_per_data_folder(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path)
    with pytest.raises(StoreUnavailable, match="another meds process"):
        SQLiteStore(tmp_path)
    first.close()
    SQLiteStore(tmp_path).close()


def test_wal_mode_and_full_sync(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_read_only_view_sees_commits_and_refits_from_it(tmp_path: Path) -> None:
    writer = SQLiteStore(tmp_path)
    key = MemoryKey("p", Group.WRONG)
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    ids = [f"r{i}" for i in range(6)]
    writer.commit(
        "r", RunConfig(dim=3), ScoredBatch([KeyAppend(key, 0, x, 0, ids, result_records([result(i) for i in ids]))])
    )
    reader = open_store(writer.spec(), read_only=True)
    assert np.array_equal(reader.load_keys("r", [key], 3)[key].vectors, x)
    with pytest.raises(StoreUnavailable):
        reader.save_run("r", RunConfig())
    fits = refit_job(writer.spec(), "r", RunConfig(dim=3), [MemoryKey("p", Group.WRONG)])
    assert len(fits) == 1 and fits[0].fitted_upto == 6 and len(fits[0].labels) == 6
    writer.close()


def test_unopenable_store_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        SQLiteStore(tmp_path / "missing", read_only=True).ping()


def test_broken_connection_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    store._db.close()
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.save_run("r", RunConfig())
    store._db = sqlite3.connect(":memory:")
    store.close()


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown store backend"):
        open_store(StoreSpec("postgres", "x"))


def test_checkpoint_moves_the_wal_into_the_database_file(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    key = MemoryKey("p", Group.WRONG)
    ids = [f"r{i}" for i in range(2000)]
    x = np.random.default_rng(1).standard_normal((2000, 64)).astype(np.float32)
    store.commit(
        "r", RunConfig(dim=64), ScoredBatch([KeyAppend(key, 0, x, 0, ids, result_records([result(i) for i in ids]))])
    )
    before = store.path.stat().st_size
    store.checkpoint()  # a commit just happened: not now
    assert store.path.stat().st_size == before
    store.checkpoint(idle_s=0)
    assert store.path.stat().st_size > before + x.nbytes // 2  # the vectors are now in the main file
    assert np.array_equal(store.load_keys("r", [key], 64)[key].vectors, x)
    store.close()
