"""SQLite specifics: one writer per folder, read-only worker views, errors become StoreUnavailable."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
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


class _CommitAfterKeyScan:
    """A read-only view's connection that lets the writer commit a new key right after the view has listed the
    keys it knows, and before it lists chunks: the moment a refit worker's catch-up can be overtaken."""

    def __init__(self, db: sqlite3.Connection, commit: object) -> None:
        self._db, self._commit, self.fired = db, commit, False

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        cursor = self._db.execute(sql, *args)
        if sql.startswith("SELECT key_id, run_id, prompt_id, grp FROM keys") and not self.fired:
            self.fired = True
            rows = cursor.fetchall()
            self._commit()  # type: ignore[operator]
            return _rows(self._db, rows)
        return cursor

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def _rows(db: sqlite3.Connection, rows: list[tuple[object, ...]]) -> sqlite3.Cursor:
    """A cursor over rows already fetched (4 columns)."""
    if not rows:
        return db.execute("SELECT 1, 2, 3, 4 WHERE 0")
    values = ", ".join("(?, ?, ?, ?)" for _ in rows)
    return db.execute(f"SELECT * FROM (VALUES {values})", [v for row in rows for v in row])


def _appender(writer: SQLiteStore, rng: np.random.Generator) -> Callable[[MemoryKey, int, int], None]:
    """Commits n random 3-dim vectors to a key of run "r", its sequence numbers from `first` on."""

    def append(key: MemoryKey, first: int, n: int) -> None:
        ids = [f"{key.prompt_id}{first + i}" for i in range(n)]
        x = rng.standard_normal((n, 3)).astype(np.float32)
        records = result_records([result(i) for i in ids])
        writer.commit("r", RunConfig(dim=3), ScoredBatch([KeyAppend(key, first, x, 0, ids, records)]))

    return append


def test_a_read_only_view_never_loses_a_chunk_committed_during_its_catch_up(tmp_path: Path) -> None:
    """A worker's view lists keys, then chunks: a commit of a new key in between must not leave that key's
    chunk skipped for good (a refit of it would then never cover its vectors, and the exact rule would
    refuse every batch that reads it)."""
    writer = SQLiteStore(tmp_path)
    append = _appender(writer, np.random.default_rng(1))
    old, new = MemoryKey("p", Group.WRONG), MemoryKey("q", Group.WRONG)
    append(old, 0, 4)
    reader = open_store(writer.spec(), read_only=True)
    assert isinstance(reader, SQLiteStore)
    assert reader.load_keys("r", [old], 3)[old].n == 4
    append(old, 4, 2)
    reader._db = _CommitAfterKeyScan(reader._db, lambda: append(new, 0, 5))  # type: ignore[assignment]
    reader.load_keys("r", [old], 3)
    assert reader._db.fired  # type: ignore[attr-defined]
    assert reader.load_keys("r", [new], 3)[new].n == 5
    writer.close()


def test_a_view_opened_while_a_new_key_commits_never_loses_its_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same moment at the view's first catch-up, when it opens: a refit worker opens its view on its first
    job, while the service keeps committing. A chunk skipped there left the key's refits short for good, and
    every batch that read the key was refused with 503 ("refits of this batch's keys keep going stale")."""
    writer = SQLiteStore(tmp_path)
    append = _appender(writer, np.random.default_rng(2))
    old, new = MemoryKey("p", Group.WRONG), MemoryKey("q", Group.WRONG)
    append(old, 0, 4)
    connect, views = sqlite3.connect, []

    def connect_view(*args: object, **kwargs: object) -> _CommitAfterKeyScan:
        view = _CommitAfterKeyScan(connect(*args, **kwargs), lambda: append(new, 0, 5))  # type: ignore[arg-type]
        views.append(view)
        return view

    monkeypatch.setattr(sqlite3, "connect", connect_view)
    reader = open_store(writer.spec(), read_only=True)
    monkeypatch.undo()
    assert [view.fired for view in views] == [True]
    states = reader.load_keys("r", [old, new], 3)
    assert (states[old].n, states[new].n) == (4, 5)
    fits = refit_job(writer.spec(), "r", RunConfig(dim=3), [new])  # a worker's refit covers the whole key
    assert [fit.fitted_upto for fit in fits] == [5]
    reader.close()
    writer.close()


def test_the_checkpoint_thread_grows_the_id_index_that_the_next_commits_would_grow(tmp_path: Path) -> None:
    """Grown inside a commit, the rollout-id index places every id again in that request (61 ms against 11 ms
    for a 20-epoch run of 8,192-rollout steps). The checkpoint thread grows it ahead instead."""
    store = SQLiteStore(tmp_path)
    append = _appender(store, np.random.default_rng(3))
    key = MemoryKey("p", Group.WRONG)
    for first in range(0, 600, 200):
        append(key, first, 200)
    ids = store._runs["r"].ids
    assert ids.capacity == 2048  # holds 1,024 ids before it grows: 3 more commits of 200 would cross that
    store.checkpoint(idle_s=60)  # busy for the WAL (a commit came less than 60 s ago), yet the index grows
    assert ids.capacity == 4096
    store.checkpoint(idle_s=0)
    assert ids.capacity == 4096  # only when the next commits would make it grow
    for first in range(600, 2000, 200):  # up to 2,000 ids: under the grown table's bound of 2,048
        append(key, first, 200)
        assert ids.capacity == 4096
    rollouts = [f"p{i}" for i in range(2000)]
    known = store.find_results("r", ["p"] * 2000, rollouts, None)
    assert sorted(known) == sorted(rollouts)
    store.close()


def test_a_view_reads_again_the_chunks_of_a_key_it_holds_with_a_hole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Should a view's list of a key's chunks ever miss one again (the defect the two tests above reproduce),
    its refits would fall short for good and the exact rule would refuse the key until a restart: the view
    finds the hole when it loads the key and reads the key's chunks from the table again."""
    writer = SQLiteStore(tmp_path)
    append = _appender(writer, np.random.default_rng(4))
    key = MemoryKey("p", Group.WRONG)
    for first in range(0, 9, 3):
        append(key, first, 3)
    reader = open_store(writer.spec(), read_only=True)
    assert isinstance(reader, SQLiteStore)
    whole = reader.load_keys("r", [key], 3)[key].vectors
    entry = reader._runs["r"].keys[key]
    for column in (entry.chunk_ids, entry.firsts, entry.counts):  # the first chunk lost, as the defect lost it
        column.pop(0)
    assert not entry.whole
    with caplog.at_level("WARNING"):
        state = reader.load_keys("r", [key], 3)[key]
    assert state.n == 9 and np.array_equal(state.vectors, whole)
    assert entry.whole and "hole in its chunks" in caplog.text
    reader.close()
    writer.close()
