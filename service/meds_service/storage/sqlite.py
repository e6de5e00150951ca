"""The embedded store: one SQLite file in WAL mode, the zero-setup default for one machine.

Every score request is one transaction (vectors, key counters and rollout results), committed before the
HTTP response is sent; with `synchronous=FULL` a commit survives a power cut as well as a SIGKILL. The
process that serves the API is the only writer (an exclusive lock file guards the data folder); refit
worker processes read the file through their own read-only connections.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import RunConfig
from ..core.errors import StoreUnavailable
from ..core.records import KeyHead, RunCounts, RunRecord
from ..core.types import Fit, Group, KeyState, MemoryKey, RolloutResult, RolloutStatus, ScoredBatch

DB_FILE = "meds.sqlite3"
LOCK_FILE = "meds.lock"
_SQL_VARS = 900  # stay far below SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
    run_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys(
    key_id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    prompt_id TEXT NOT NULL,
    grp INTEGER NOT NULL,
    start INTEGER NOT NULL,
    n INTEGER NOT NULL,
    fit_start INTEGER NOT NULL DEFAULT 0,
    fitted_upto INTEGER NOT NULL DEFAULT 0,
    labels BLOB,
    UNIQUE(run_id, prompt_id, grp)
);
CREATE TABLE IF NOT EXISTS chunks(
    key_id INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    vectors BLOB NOT NULL,
    PRIMARY KEY(key_id, first_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollouts(
    run_id INTEGER NOT NULL,
    rollout_id TEXT NOT NULL,
    cluster INTEGER,
    cluster_size INTEGER NOT NULL,
    penalty REAL NOT NULL,
    shaped_reward REAL,
    PRIMARY KEY(run_id, rollout_id)
) WITHOUT ROWID;
"""


class SQLiteStore:
    """`MemoryStore` on one SQLite file. Thread-safe: one connection, serialised by a lock."""

    shared = False  # the only writer: the engine's cache is authoritative between calls

    def __init__(self, data_dir: str | Path, *, synchronous: str = "FULL", read_only: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_FILE
        self.read_only = read_only
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        try:
            if read_only:
                uri = f"file:{self.path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._take_folder_lock()
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={synchronous}")
                self._db.execute("PRAGMA cache_size=-262144")  # 256 MiB: random-id inserts stay in memory
                self._db.executescript(_SCHEMA)
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        self._run_ids: dict[str, int] = {}
        self._key_ids: dict[tuple[int, str, int], int] = {}

    def spec(self) -> tuple[str, str]:
        """A picklable description from which a worker process opens its own read-only view."""
        return ("sqlite", str(self.data_dir))

    def _take_folder_lock(self) -> None:
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StoreUnavailable(
                f"another meds process already owns {self.data_dir}; use the Redis store to run several"
            ) from exc
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # ---- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite read failed: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite store busy: {exc}") from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._db.execute("ROLLBACK")
                self._key_ids.clear()  # it may hold ids of rows the rollback removed
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(f"SQLite write failed: {exc}") from exc
                raise

    def _run_id(self, db: sqlite3.Connection, run: str) -> int | None:
        run_id = self._run_ids.get(run)
        if run_id is None:
            row = db.execute("SELECT run_id FROM runs WHERE name=?", (run,)).fetchone()
            if row is None:
                return None
            run_id = self._run_ids[run] = int(row[0])
        return run_id

    def ping(self) -> None:
        with self._read() as db:
            db.execute("SELECT 1").fetchone()

    # ---- runs -------------------------------------------------------------------------------------

    def list_runs(self) -> list[RunRecord]:
        with self._read() as db:
            rows = db.execute("SELECT name, config, created_at FROM runs ORDER BY name").fetchall()
        return [RunRecord(name, RunConfig.from_mapping(json.loads(cfg)), created) for name, cfg, created in rows]

    def get_run(self, run: str) -> RunRecord | None:
        with self._read() as db:
            row = db.execute("SELECT name, config, created_at FROM runs WHERE name=?", (run,)).fetchone()
        return None if row is None else RunRecord(row[0], RunConfig.from_mapping(json.loads(row[1])), row[2])

    def save_run(self, run: str, config: RunConfig) -> RunRecord:
        with self._write() as db:
            self._upsert_run(db, run, config)
            row = db.execute("SELECT created_at FROM runs WHERE name=?", (run,)).fetchone()
        return RunRecord(run, config, float(row[0]))

    def _upsert_run(self, db: sqlite3.Connection, run: str, config: RunConfig) -> int:
        db.execute(
            "INSERT INTO runs(name, config, created_at) VALUES(?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET config=excluded.config",
            (run, json.dumps(config.as_dict()), time.time()),
        )
        run_id = self._run_id(db, run)
        assert run_id is not None
        return run_id

    def delete_run(self, run: str) -> bool:
        with self._write() as db:
            run_id = self._run_id(db, run)
            if run_id is None:
                return False
            db.execute("DELETE FROM chunks WHERE key_id IN (SELECT key_id FROM keys WHERE run_id=?)", (run_id,))
            db.execute("DELETE FROM keys WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM rollouts WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
        self._run_ids.pop(run, None)
        self._key_ids.clear()  # row ids may be reused by later runs
        return True

    def counts(self, run: str) -> RunCounts:
        with self._read() as db:
            run_id = self._run_id(db, run)
            if run_id is None:
                return RunCounts(0, 0, 0)
            keys, vectors = db.execute(
                "SELECT count(*), coalesce(sum(n - start), 0) FROM keys WHERE run_id=?", (run_id,)
            ).fetchone()
            (rollouts,) = db.execute("SELECT count(*) FROM rollouts WHERE run_id=?", (run_id,)).fetchone()
        return RunCounts(int(keys), int(vectors), int(rollouts))

    # ---- memory -----------------------------------------------------------------------------------

    def key_heads(self, run: str) -> dict[MemoryKey, KeyHead]:
        """Counters of every key of a run (no vectors): what start-up and refit scheduling need."""
        with self._read() as db:
            run_id = self._run_id(db, run)
            if run_id is None:
                return {}
            rows = db.execute(
                "SELECT prompt_id, grp, start, n, fit_start, fitted_upto FROM keys WHERE run_id=?", (run_id,)
            ).fetchall()
        return {MemoryKey(p, Group(g)): KeyHead(s, n, fs, fu) for p, g, s, n, fs, fu in rows}

    def load_keys(self, run: str, keys: Sequence[MemoryKey] | None, dim: int) -> dict[MemoryKey, KeyState]:
        """Vectors and last fit of the given keys (all keys of the run when `keys` is None)."""
        with self._read() as db:
            run_id = self._run_id(db, run)
            if run_id is None:
                return {}
            if keys is None:
                rows = db.execute(
                    "SELECT key_id, prompt_id, grp, start, n, fit_start, fitted_upto, labels FROM keys WHERE run_id=?",
                    (run_id,),
                ).fetchall()
            else:
                rows = []
                for key in keys:
                    row = db.execute(
                        "SELECT key_id, prompt_id, grp, start, n, fit_start, fitted_upto, labels "
                        "FROM keys WHERE run_id=? AND prompt_id=? AND grp=?",
                        (run_id, key.prompt_id, int(key.group)),
                    ).fetchone()
                    if row is not None:
                        rows.append(row)
            states = {}
            for key_id, prompt_id, grp, start, n, fit_start, fitted_upto, labels in rows:
                chunks = db.execute(
                    "SELECT first_seq, vectors FROM chunks WHERE key_id=? ORDER BY first_seq", (key_id,)
                ).fetchall()
                states[MemoryKey(prompt_id, Group(grp))] = KeyState(
                    vectors=_join_chunks(chunks, start, n, dim),
                    start=start,
                    labels=_decode_labels(labels),
                    fit_start=fit_start,
                    fitted_upto=fitted_upto,
                )
        return states

    def find_results(self, run: str, rollout_ids: Sequence[str]) -> dict[str, RolloutResult]:
        """Stored results of the rollouts among `rollout_ids` that this run has already scored."""
        found: dict[str, RolloutResult] = {}
        with self._read() as db:
            run_id = self._run_id(db, run)
            if run_id is None:
                return found
            for lo in range(0, len(rollout_ids), _SQL_VARS):
                part = rollout_ids[lo : lo + _SQL_VARS]
                rows = db.execute(
                    "SELECT rollout_id, cluster, cluster_size, penalty, shaped_reward FROM rollouts "
                    f"WHERE run_id=? AND rollout_id IN ({','.join('?' * len(part))})",
                    (run_id, *part),
                ).fetchall()
                for rid, cluster, size, penalty, shaped in rows:
                    found[rid] = RolloutResult(rid, RolloutStatus.SCORED, cluster, size, penalty, shaped)
        return found

    def commit(self, run: str, config: RunConfig, batch: ScoredBatch) -> None:
        """Append a scored batch atomically: vectors, key counters, results (and the run's config)."""
        with self._write() as db:
            run_id = self._upsert_run(db, run, config)
            key_ids = [self._key_id(db, run_id, a.key) for a in batch.appends]
            before = db.total_changes
            db.executemany(
                "UPDATE keys SET start=?, n=? WHERE key_id=? AND n=?",
                [
                    (a.new_start, a.first_seq + len(a.vectors), key_id, a.first_seq)
                    for a, key_id in zip(batch.appends, key_ids, strict=True)
                ],
            )
            if db.total_changes - before != len(batch.appends):
                raise StoreUnavailable("a key of this batch changed under its only writer; nothing was stored")
            db.executemany(
                "INSERT INTO chunks(key_id, first_seq, vectors) VALUES(?, ?, ?)",
                [
                    (key_id, a.first_seq, a.vectors.astype("<f4", copy=False).tobytes())
                    for a, key_id in zip(batch.appends, key_ids, strict=True)
                ],
            )
            for a, key_id in zip(batch.appends, key_ids, strict=True):
                if a.new_start > 0:  # a capped memory: forget what fell out of it
                    _drop_dead_chunks(db, key_id, a.new_start, a.vectors.shape[1])
            db.executemany(
                "INSERT INTO rollouts(run_id, rollout_id, cluster, cluster_size, penalty, shaped_reward) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                [(run_id, r.rollout_id, r.cluster, r.cluster_size, r.penalty, r.shaped_reward) for r in batch.results],
            )
            _save_fits(db, run_id, batch.fits)

    def _key_id(self, db: sqlite3.Connection, run_id: int, key: MemoryKey) -> int:
        """The row id of a key, created empty when new (cached: this process is the only writer)."""
        ident = (run_id, key.prompt_id, int(key.group))
        key_id = self._key_ids.get(ident)
        if key_id is None:
            row = db.execute("SELECT key_id FROM keys WHERE run_id=? AND prompt_id=? AND grp=?", ident).fetchone()
            if row is None:
                row = db.execute(
                    "INSERT INTO keys(run_id, prompt_id, grp, start, n) VALUES(?, ?, ?, 0, 0) RETURNING key_id", ident
                ).fetchone()
            key_id = self._key_ids[ident] = int(row[0])
        return key_id

    def save_fits(self, run: str, fits: Sequence[Fit]) -> int:
        """Store new labels; a fit older than the stored one is ignored. Returns how many were saved."""
        with self._write() as db:
            run_id = self._run_id(db, run)
            return 0 if run_id is None else _save_fits(db, run_id, fits)

    def info(self) -> dict[str, Any]:
        return {"backend": "sqlite", "path": str(self.path)}


def _join_chunks(chunks: list[tuple[int, bytes]], start: int, n: int, dim: int) -> np.ndarray:
    parts = [np.frombuffer(blob, dtype="<f4").reshape(-1, dim) for _, blob in chunks]
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    first_seq = chunks[0][0]
    allrows = np.concatenate(parts).astype(np.float32, copy=False)
    rows = allrows[start - first_seq : n - first_seq]
    return np.ascontiguousarray(rows)


def _decode_labels(blob: bytes | None) -> np.ndarray:
    if not blob:
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(blob, dtype="<i4").astype(np.int64)


def _drop_dead_chunks(db: sqlite3.Connection, key_id: int, new_start: int, dim: int) -> None:
    """Delete chunks whose every vector fell out of a capped memory (sequence numbers below new_start)."""
    rows = db.execute(
        "SELECT first_seq, length(vectors) FROM chunks WHERE key_id=? AND first_seq < ?", (key_id, new_start)
    ).fetchall()
    dead = [first for first, nbytes in rows if first + nbytes // (4 * dim) <= new_start]
    db.executemany("DELETE FROM chunks WHERE key_id=? AND first_seq=?", [(key_id, f) for f in dead])


def _save_fits(db: sqlite3.Connection, run_id: int, fits: Sequence[Fit]) -> int:
    saved = 0
    for fit in fits:
        cur = db.execute(
            "UPDATE keys SET labels=?, fit_start=?, fitted_upto=? "
            "WHERE run_id=? AND prompt_id=? AND grp=? AND fitted_upto<=? AND fit_start<=?",
            (
                fit.labels.astype("<i4").tobytes(),
                fit.fit_start,
                fit.fitted_upto,
                run_id,
                fit.key.prompt_id,
                int(fit.key.group),
                fit.fitted_upto,
                fit.fit_start,
            ),
        )
        saved += cur.rowcount
    return saved
