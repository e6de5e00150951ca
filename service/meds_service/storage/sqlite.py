"""The embedded store: one SQLite file in WAL mode, the zero-setup default for one machine.

Layout: an append-only log of *chunks* (one per key per score request: its vectors, rollout ids, id hashes
and results) plus small tables of runs, keys and fits. Appending is what keeps a commit cheap however long
the run: a B-tree keyed by random rollout ids would rewrite pages all over the file on every request.
Everything needed to find things again (which chunks a key has, which rollout ids were seen) is a
catalog in memory, rebuilt by scanning the log at start and kept current incrementally.

Every score request is one transaction, committed (fsync with `synchronous=FULL`) before the HTTP answer.
The API process is the only writer (a lock file guards the folder); refit workers open read-only views
that follow the log.

One module for the whole adapter, over the usual ~400 lines: the in-memory catalog and the SQL that it
mirrors must change together, and reading them side by side is how they stay in step.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .. import faults
from ..core.config import RunConfig
from ..core.errors import IdCollision, StoreUnavailable
from ..core.records import KeyHead, RunCounts, RunRecord, StoreSpec
from ..core.types import (
    NO_STEP,
    RESULT_DTYPE,
    Fit,
    Group,
    KeyDelta,
    KeyState,
    MemoryKey,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
    rollout_hashes,
)
from .idindex import IdIndex

log = logging.getLogger(__name__)
DB_FILE = "meds.sqlite3"
LOCK_FILE = "meds.lock"
_SQL_VARS = 900  # stay far below SQLite's bound-parameter limit
_POS_BITS = 20  # id-index values: chunk_id << 20 | position in chunk

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys(
    key_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    prompt_id TEXT NOT NULL,
    grp INTEGER NOT NULL,
    UNIQUE(run_id, prompt_id, grp)
);
CREATE TABLE IF NOT EXISTS chunks(
    chunk_id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    vectors BLOB NOT NULL,
    hashes BLOB NOT NULL,
    ids BLOB NOT NULL,
    results BLOB NOT NULL,
    step INTEGER
);
CREATE TABLE IF NOT EXISTS fits(
    key_id INTEGER PRIMARY KEY,
    fit_start INTEGER NOT NULL,
    fitted_upto INTEGER NOT NULL,
    labels BLOB NOT NULL
);
"""


@dataclass
class _Key(KeyHead):
    """A key in the catalog: its counters and where its chunks are."""

    key_id: int = field(kw_only=True)
    run_id: int = field(kw_only=True)
    key: MemoryKey = field(kw_only=True)
    # Chunks in order, as flat integer arrays (no Python object per chunk: long runs have millions).
    chunk_ids: array[int] = field(default_factory=lambda: array("q"))
    firsts: array[int] = field(default_factory=lambda: array("q"))
    counts: array[int] = field(default_factory=lambda: array("q"))

    def chunks(self) -> Iterator[tuple[int, int, int]]:
        """(chunk_id, first_seq, count) of every chunk."""
        return zip(self.chunk_ids, self.firsts, self.counts, strict=True)

    @property
    def whole(self) -> bool:
        """Whether the chunks cover sequence numbers 0..n without a hole (each starts where the last ended)."""
        if not self.firsts:
            return self.n == 0
        firsts = np.frombuffer(self.firsts, dtype=np.int64)
        counts = np.frombuffer(self.counts, dtype=np.int64)
        return bool(firsts[0] == 0 and np.array_equal(firsts[1:], firsts[:-1] + counts[:-1]))


@dataclass
class _Run:
    run_id: int
    name: str
    keys: dict[MemoryKey, _Key] = field(default_factory=dict)
    ids: IdIndex = field(default_factory=IdIndex)


class SQLiteStore:
    """`MemoryStore` on one SQLite file. Thread-safe: one connection, serialised by a lock.

    The API process is its only writer, so the engine holds it with `LocalCoordination`."""

    def __init__(self, data_dir: str | Path, *, synchronous: str = "FULL", read_only: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_FILE
        self.read_only = read_only
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._runs: dict[str, _Run] = {}
        self._run_names: dict[int, str] = {}
        self._keys: dict[int, _Key] = {}
        self._seen_key = self._seen_chunk = 0
        self._checkpointer: sqlite3.Connection | None = None
        self._last_write = 0.0
        try:
            if read_only:
                self._db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._take_folder_lock()
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={synchronous}")
                # Checkpoints run in the background (checkpoint()); this is only a safety valve (~400 MB).
                self._db.execute("PRAGMA wal_autocheckpoint=100000")
                self._db.executescript(_SCHEMA)
                _add_step_column(self._db)
                _add_texts_column(self._db)
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB
            with self._lock, self._caught_up():
                pass
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc

    finds_ids_by_hash = True  # the rollout-id index (storage/idindex.py) is keyed by rollout_hashes

    def spec(self) -> StoreSpec:
        """A picklable description from which a worker process opens its own read-only view."""
        return StoreSpec("sqlite", str(self.data_dir))

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

    def checkpoint(self, idle_s: float = 0.5, force_bytes: int = 256 * 1024 * 1024) -> None:
        """Copy the WAL into the database file, on a connection of its own so that commits never wait for
        it (the writer's connection does not checkpoint on commit). Runs when no commit came for `idle_s`
        (between a trainer's steps), or when the WAL has grown past `force_bytes` anyway. Before that, on every
        call, it grows the rollout-id indexes that the next requests would make grow (`_grow_ids_ahead`)."""
        if self.read_only:
            return
        self._grow_ids_ahead()
        wal = self.path.with_name(self.path.name + "-wal")
        busy = time.monotonic() - self._last_write < idle_s
        if busy and (not wal.exists() or wal.stat().st_size < force_bytes):
            return
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._checkpointer.execute("PRAGMA busy_timeout=1000")
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite checkpoint failed: {exc}") from exc

    def _grow_ids_ahead(self) -> None:
        """Grow each run's rollout-id index that the next few requests would make grow (`IdIndex.grow_ahead`),
        in the checkpoint thread (once a second), so most often between a trainer's steps. Grown inside a
        commit, the index placed every id again in that request: a 20-epoch run of 8,192-rollout steps took
        61 ms to commit the step that crossed 262,144 ids, against 11 ms for the others. A request that comes
        while this runs waits for the store's lock, as long as the growth would have taken inside it."""
        with self._lock:
            for run in self._runs.values():
                run.ids.grow_ahead()

    def close(self) -> None:
        with self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def info(self) -> dict[str, str]:
        return {"backend": "sqlite", "path": str(self.path)}

    # ---- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if not self.read_only:
                    yield self._db
                    return
                with self._caught_up():
                    yield self._db
            except sqlite3.Error as exc:
                raise _unavailable("SQLite read failed", exc) from exc

    @contextmanager
    def _caught_up(self) -> Iterator[None]:
        """Catch the catalog up with the log, then read, in one transaction (one snapshot of the file).

        A view (a refit worker) follows a file that the writer keeps committing to. Read in separate
        statements, a commit between the list of keys and the list of chunks would show a chunk of a key the
        view does not know yet, which it would then skip for good: its refits would never cover that key's
        vectors. This holds for the first catch-up, when the view opens, as for every later one. The writer
        catches up once, at open, before anything else can write."""
        began = not self._db.in_transaction
        if began:
            self._db.execute("BEGIN")
        try:
            self._follow_log(with_ids=not self.read_only)
            yield
        finally:
            if began and self._db.in_transaction:
                self._db.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._last_write = time.monotonic()
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _unavailable("SQLite store busy or unwritable", exc) from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise _unavailable("SQLite write failed", exc) from exc
                raise

    def _rollback(self) -> None:
        """Undo the open transaction, if any: a failed COMMIT (disk full, I/O error) has often ended it
        already, and a ROLLBACK then raises 'no transaction is active', which must not hide the fault."""
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the connection stays usable: the next BEGIN reports what is wrong
            log.warning("SQLite rollback failed: %s", exc)

    def _follow_log(self, *, with_ids: bool) -> None:
        """Bring the catalog up to date with rows added since the last look (all of them at start)."""
        db = self._db
        for run_id, name in db.execute("SELECT run_id, name FROM runs").fetchall():
            if name not in self._runs or self._runs[name].run_id != run_id:
                self._runs[name] = _Run(run_id, name)
                self._run_names[run_id] = name
        rows = db.execute(
            "SELECT key_id, run_id, prompt_id, grp FROM keys WHERE key_id > ? ORDER BY key_id", (self._seen_key,)
        ).fetchall()
        for key_id, run_id, prompt_id, grp in rows:
            self._add_key(key_id, run_id, MemoryKey(prompt_id, Group(grp)))
            self._seen_key = key_id
        rows = db.execute(
            "SELECT chunk_id, key_id, first_seq, start, count, hashes FROM chunks WHERE chunk_id > ? ORDER BY chunk_id",
            (self._seen_chunk,),
        ).fetchall()
        for chunk_id, key_id, first_seq, start, count, hashes in rows:
            entry = self._keys.get(key_id)
            if entry is not None:
                self._add_chunk(entry, chunk_id, first_seq, start, count)
                if with_ids:
                    self._remember_ids(entry, chunk_id, np.frombuffer(hashes, dtype="<u8"))
            self._seen_chunk = chunk_id
        if with_ids:
            for key_id, fit_start, fitted_upto in db.execute("SELECT key_id, fit_start, fitted_upto FROM fits"):
                if key_id in self._keys:
                    self._keys[key_id].fit_start, self._keys[key_id].fitted_upto = fit_start, fitted_upto

    def _add_key(self, key_id: int, run_id: int, key: MemoryKey) -> _Key:
        entry = self._keys[key_id] = _Key(key_id=key_id, run_id=run_id, key=key)
        name = self._run_names.get(run_id)
        if name is not None:
            self._runs[name].keys[key] = entry
        return entry

    @staticmethod
    def _add_chunk(entry: _Key, chunk_id: int, first_seq: int, start: int, count: int) -> None:
        entry.chunk_ids.append(chunk_id)
        entry.firsts.append(first_seq)
        entry.counts.append(count)
        entry.n = first_seq + count
        entry.start = start

    def _reread_chunks(self, db: sqlite3.Connection, entry: _Key) -> None:
        """Rebuild a view's list of a key's chunks from the table, when it has a hole. Catch-ups in one read
        transaction leave none (`_caught_up`); should one appear all the same, a refit of the key would fall
        short of its vectors for good, and the exact rule would refuse every batch reading it until a restart.
        A full scan of the table (no index by key), so only for a key found broken."""
        log.warning("store view of key %s had a hole in its chunks; reading them again", entry.key)
        rows = db.execute(
            "SELECT chunk_id, first_seq, start, count FROM chunks WHERE key_id = ? AND chunk_id <= ? ORDER BY chunk_id",
            (entry.key_id, self._seen_chunk),
        ).fetchall()
        entry.chunk_ids, entry.firsts, entry.counts = array("q"), array("q"), array("q")
        for chunk_id, first_seq, start, count in rows:
            self._add_chunk(entry, chunk_id, first_seq, start, count)

    def _remember_ids(self, entry: _Key, chunk_id: int, hashes: np.ndarray) -> None:
        name = self._run_names.get(entry.run_id)
        if name is not None:
            values = (np.int64(chunk_id) << _POS_BITS) | np.arange(len(hashes), dtype=np.int64)
            self._runs[name].ids.insert(hashes.astype(np.uint64), values)

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

    def _upsert_run(self, db: sqlite3.Connection, run: str, config: RunConfig) -> _Run:
        row = db.execute(
            "INSERT INTO runs(name, config, created_at) VALUES(?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET config=excluded.config RETURNING run_id",
            (run, json.dumps(config.as_dict()), time.time()),
        ).fetchone()
        entry = self._runs.get(run)
        if entry is None or entry.run_id != row[0]:
            entry = self._runs[run] = _Run(int(row[0]), run)
            self._run_names[entry.run_id] = run
        return entry

    def delete_run(self, run: str) -> bool:
        with self._write() as db:
            entry = self._runs.get(run)
            if entry is None:
                return False
            key_ids = [k.key_id for k in entry.keys.values()]
            chunk_ids = [c for k in entry.keys.values() for c in k.chunk_ids]
            for table, column, ids in (
                ("chunks", "chunk_id", chunk_ids),
                ("fits", "key_id", key_ids),
                ("keys", "key_id", key_ids),
            ):
                _where_in(db, f"DELETE FROM {table} WHERE {column} IN ({{}})", ids)
            db.execute("DELETE FROM runs WHERE run_id=?", (entry.run_id,))
        for key_id in key_ids:
            self._keys.pop(key_id, None)
        self._run_names.pop(entry.run_id, None)
        del self._runs[run]
        return True

    def counts(self, run: str) -> RunCounts:
        with self._read():
            entry = self._runs.get(run)
            if entry is None:
                return RunCounts(0, 0, 0)
            keys = entry.keys.values()
            return RunCounts(len(keys), sum(k.n - k.start for k in keys), sum(k.n for k in keys))

    # ---- memory -----------------------------------------------------------------------------------

    def key_heads(self, run: str) -> dict[MemoryKey, KeyHead]:
        """Counters of every key of a run (no vectors)."""
        with self._read():
            entry = self._runs.get(run)
            if entry is None:
                return {}
            return {k: KeyHead(e.start, e.n, e.fit_start, e.fitted_upto) for k, e in entry.keys.items()}

    def heads(self, run: str, keys: Sequence[MemoryKey]) -> dict[MemoryKey, KeyHead]:
        """Counters of the given keys (zeros for keys that are not stored)."""
        with self._read():
            entry = self._runs.get(run)
            held = {} if entry is None else entry.keys
            return {key: KeyHead(e.start, e.n, e.fit_start, e.fitted_upto) if (e := held.get(key)) else KeyHead()
                    for key in keys}  # fmt: skip

    def list_keys(self, run: str, pending_only: bool = False) -> list[MemoryKey]:
        """The run's keys (only those whose last fit does not cover their live vectors, if asked)."""
        with self._read():
            entry = self._runs.get(run)
            if entry is None:
                return []
            return sorted(k.key for k in entry.keys.values() if not pending_only or k.stale)

    def pending_count(self, run: str) -> int:
        return len(self.list_keys(run, pending_only=True))

    def load_changes(self, run: str, since: Mapping[MemoryKey, KeyHead], dim: int) -> dict[MemoryKey, KeyDelta]:
        """For each key, the vectors appended after since[key].n and its fit when it is not since's."""
        with self._read() as db:
            entry = self._runs.get(run)
            known = {} if entry is None else {key: entry.keys[key] for key in since if key in entry.keys}
            firsts = {k.key_id: max(since[key].n, k.start) for key, k in known.items()}
            changed = [k for key, k in known.items() if not k.same_fit(since[key])]
            vectors, fits = self._load(db, list(known.values()), firsts, changed, dim)
        empty = np.zeros((0, dim), np.float32)
        changes = {key: KeyDelta(0, 0, 0, empty) for key in since if key not in known}
        for key, k in known.items():
            changes[key] = KeyDelta(k.start, k.n, firsts[k.key_id], vectors[k.key_id], fits.get(k.key_id))
        return changes

    def load_keys(self, run: str, keys: Sequence[MemoryKey] | None, dim: int) -> dict[MemoryKey, KeyState]:
        """Live vectors and last fit of the given keys (all keys of the run when `keys` is None)."""
        with self._read() as db:
            entry = self._runs.get(run)
            if entry is None:
                return {}
            wanted = list(entry.keys.values()) if keys is None else [entry.keys[k] for k in keys if k in entry.keys]
            if self.read_only:
                for key in wanted:
                    if not key.whole:
                        self._reread_chunks(db, key)
            vectors, fits = self._load(db, wanted, {k.key_id: k.start for k in wanted}, wanted, dim)
        states = {}
        for k in wanted:
            fit = fits[k.key_id]
            states[k.key] = KeyState(vectors[k.key_id], k.start, fit.labels, fit.fit_start, fit.fitted_upto)
        return states

    @staticmethod
    def _load(
        db: sqlite3.Connection, keys: Sequence[_Key], firsts: Mapping[int, int], fitted: Sequence[_Key], dim: int
    ) -> tuple[dict[int, np.ndarray], dict[int, Fit]]:
        """Vectors of each key from sequence number firsts[key_id] on, and the fits of the `fitted` keys,
        reading only the chunks that hold them."""
        owner = {c[0]: k for k in keys for c in k.chunks() if c[1] + c[2] > firsts[k.key_id]}
        blobs: dict[int, list[tuple[int, bytes]]] = {}
        for chunk_id, blob in _where_in(db, "SELECT chunk_id, vectors FROM chunks WHERE chunk_id IN ({})", list(owner)):
            blobs.setdefault(owner[chunk_id].key_id, []).append((chunk_id, blob))
        vectors = {k.key_id: _join_chunks(k, blobs.get(k.key_id, []), firsts[k.key_id], dim) for k in keys}
        sql = "SELECT key_id, fit_start, fitted_upto, labels FROM fits WHERE key_id IN ({})"
        by_id = {k.key_id: k.key for k in fitted}
        fits = {
            key_id: Fit(by_id[key_id], np.frombuffer(labels, dtype="<i4").astype(np.int64), fs, fu)
            for key_id, fs, fu, labels in _where_in(db, sql, list(by_id))
        }
        for k in fitted:  # never fitted: say so, so that a cache holding a stale fit drops it
            fits.setdefault(k.key_id, Fit(k.key, np.zeros(0, np.int64), 0, 0))
        return vectors, fits

    def find_results(
        self,
        run: str,
        prompt_ids: Sequence[str],
        rollout_ids: Sequence[str],
        id_hashes: np.ndarray | None = None,
    ) -> dict[str, RolloutResult]:
        """Stored results of those rollouts (by prompt and rollout id) that this run has already scored."""
        with self._read() as db:
            entry = self._runs.get(run)
            if entry is None or not len(entry.ids):
                return {}
            hashes = rollout_hashes(prompt_ids, rollout_ids) if id_hashes is None else id_hashes
            found = entry.ids.lookup(hashes)
            hits = np.flatnonzero(found >= 0)
            if not len(hits):
                return {}
            chunks = {int(found[i]) >> _POS_BITS for i in hits}
            rows = {
                chunk_id: (orjson.loads(ids), np.frombuffer(results, dtype=RESULT_DTYPE))
                for chunk_id, ids, results in _where_in(
                    db, "SELECT chunk_id, ids, results FROM chunks WHERE chunk_id IN ({})", list(chunks)
                )
            }
        out = {}
        for i in hits.tolist():
            chunk_id, position = int(found[i]) >> _POS_BITS, int(found[i]) & ((1 << _POS_BITS) - 1)
            ids, results = rows[chunk_id]
            if ids[position] != rollout_ids[i]:
                raise IdCollision(f"rollout id {rollout_ids[i]!r} collides with another id's hash; use another id")
            out[rollout_ids[i]] = RolloutResult.from_record(rollout_ids[i], RolloutStatus.SCORED, results[position])
        return out

    def commit(self, run: str, config: RunConfig, batch: ScoredBatch) -> None:
        """Append a scored batch atomically: one chunk per key, new keys, fits (and the run's config)."""
        with self._write() as db:
            entry = self._upsert_run(db, run, config)
            keys = [self._key_entry(db, entry, a.key) for a in batch.appends]
            for a, k in zip(batch.appends, keys, strict=True):
                if a.first_seq != k.n:
                    raise StoreUnavailable(f"key {a.key} changed under its only writer; nothing was stored")
            sizes = [len(a.rollout_ids) for a in batch.appends]
            bounds = np.cumsum([0, *sizes]).tolist()
            spans = list(itertools.pairwise(bounds))
            all_hashes = self._hashes_of(batch, bounds[-1])
            # Each column converted once for the whole batch, then cut into the rows' blobs.
            hash_blob = all_hashes.astype("<u8", copy=False).tobytes()
            results = b"".join(a.results.astype(RESULT_DTYPE, copy=False).tobytes() for a in batch.appends)
            rows = np.concatenate([a.vectors for a in batch.appends] or [np.zeros((0, 0), np.float32)])
            if len(rows) != bounds[-1]:
                raise ValueError("an append has not one vector per rollout id")
            vector_blob, rowbytes, recbytes = rows.astype("<f4").tobytes(), 4 * rows.shape[1], RESULT_DTYPE.itemsize
            db.executemany(
                "INSERT INTO chunks(key_id, first_seq, start, count, vectors, hashes, ids, results, step, texts) "
                "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        k.key_id,
                        a.first_seq,
                        a.new_start,
                        len(a.rollout_ids),
                        vector_blob[lo * rowbytes : hi * rowbytes],
                        hash_blob[lo * 8 : hi * 8],
                        orjson.dumps(a.rollout_ids),
                        results[lo * recbytes : hi * recbytes],
                        a.step,
                        None if a.texts is None else orjson.dumps(a.texts),
                    )
                    for a, k, (lo, hi) in zip(batch.appends, keys, spans, strict=True)
                ],
            )
            (last,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name='chunks'").fetchone()
            first = last - len(batch.appends) + 1
            dead = [
                c[0]
                for a, k in zip(batch.appends, keys, strict=True)
                if a.new_start > k.start
                for c in k.chunks()
                if k.start < c[1] + c[2] <= a.new_start
            ]
            # A capped memory forgets vectors, keeps ids and results.
            _where_in(db, "UPDATE chunks SET vectors=x'' WHERE chunk_id IN ({})", dead)
            _save_fits(db, {k.key: k for k in keys}, batch.fits)
            faults.point("sqlite.commit.after_write")
        faults.point("sqlite.commit.after_commit")
        for offset, (a, k) in enumerate(zip(batch.appends, keys, strict=True)):
            if k.key_id not in self._keys:
                self._keys[k.key_id] = entry.keys[k.key] = k
                self._seen_key = max(self._seen_key, k.key_id)
            self._add_chunk(k, first + offset, a.first_seq, a.new_start, len(a.rollout_ids))
        self._seen_chunk = last
        if sizes:
            chunk_ids = np.repeat(np.arange(first, last + 1, dtype=np.int64), sizes)
            positions = np.arange(bounds[-1], dtype=np.int64) - np.repeat(np.asarray(bounds[:-1], np.int64), sizes)
            entry.ids.insert(all_hashes.astype(np.uint64, copy=False), (chunk_ids << _POS_BITS) | positions)
        for fit in batch.fits:
            self._adopt_fit(entry.keys[fit.key], fit)

    @staticmethod
    def _hashes_of(batch: ScoredBatch, n: int) -> np.ndarray:
        """Id hashes of a batch's rollouts, in append order: those the engine computed, else computed here."""
        if batch.id_hashes is not None and len(batch.id_hashes) == n:
            return batch.id_hashes
        return rollout_hashes(
            [a.key.prompt_id for a in batch.appends for _ in a.rollout_ids],
            [r for a in batch.appends for r in a.rollout_ids],
        )

    def _key_entry(self, db: sqlite3.Connection, run: _Run, key: MemoryKey) -> _Key:
        entry = run.keys.get(key)
        if entry is None:
            (key_id,) = db.execute(
                "INSERT INTO keys(run_id, prompt_id, grp) VALUES(?, ?, ?) RETURNING key_id",
                (run.run_id, key.prompt_id, int(key.group)),
            ).fetchone()
            # Into the catalog only once committed: a rollback must not leave it behind.
            entry = _Key(key_id=int(key_id), run_id=run.run_id, key=key)
        return entry

    def save_fits(self, run: str, fits: Sequence[Fit]) -> int:
        """Store new labels; a fit older than the stored one is ignored. Returns how many were saved."""
        with self._write() as db:
            entry = self._runs.get(run)
            if entry is None:
                return 0
            saved = _save_fits(db, entry.keys, fits)
        for fit in fits:
            if fit.key in entry.keys:
                self._adopt_fit(entry.keys[fit.key], fit)
        return saved

    @staticmethod
    def _adopt_fit(entry: _Key, fit: Fit) -> None:
        if entry.admits(fit.fit_start, fit.fitted_upto):
            entry.fit_start, entry.fitted_upto = fit.fit_start, fit.fitted_upto

    def load_steps(self, run: str, keys: Sequence[MemoryKey]) -> dict[MemoryKey, np.ndarray]:
        """The training step of each vector of these keys ever stored (sequence numbers 0..n), NO_STEP where
        none was recorded (stores written before steps were kept, or batches sent without one)."""
        with self._read() as db:
            entry = self._runs.get(run)
            held = [] if entry is None else [entry.keys[k] for k in keys if k in entry.keys]
            sql = "SELECT chunk_id, step FROM chunks WHERE chunk_id IN ({}) AND step IS NOT NULL"
            step_of = dict(_where_in(db, sql, [c for k in held for c in k.chunk_ids]))
        out = {}
        for k in held:
            steps = np.full(k.n, NO_STEP, dtype=np.int64)
            for chunk_id, first, count in k.chunks():
                if chunk_id in step_of:
                    steps[first : first + count] = step_of[chunk_id]
            out[k.key] = steps
        return out

    def prompt_results(self, run: str, prompt_id: str) -> dict[Group, np.ndarray]:
        """The stored result of every rollout of one prompt ever scored, per group (RESULT_DTYPE)."""
        with self._read() as db:
            entry = self._runs.get(run)
            held = [] if entry is None else [entry.keys[k] for k in entry.keys if k.prompt_id == prompt_id]
            sql = "SELECT chunk_id, results FROM chunks WHERE chunk_id IN ({})"
            blobs = dict(_where_in(db, sql, [c for k in held for c in k.chunk_ids]))
        return {
            k.key.group: np.concatenate(
                [np.frombuffer(blobs[c], dtype=RESULT_DTYPE) for c in k.chunk_ids if c in blobs]
                or [np.zeros(0, RESULT_DTYPE)]
            )
            for k in held
        }

    def load_texts(self, run: str, key: MemoryKey, seqs: Sequence[int]) -> list[str | None]:
        """The stored text of the key's vectors with these sequence numbers (None where none was kept)."""
        with self._read() as db:
            entry = self._runs.get(run)
            k = None if entry is None else entry.keys.get(key)
            if k is None:
                return [None] * len(seqs)
            chunks = [
                (c, first, count) for c, first, count in k.chunks() if any(first <= s < first + count for s in seqs)
            ]
            if "texts" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}:
                return [None] * len(seqs)  # a read-only view of a store written before texts were kept
            stored = dict(
                _where_in(db, "SELECT chunk_id, texts FROM chunks WHERE chunk_id IN ({})", [c for c, _, _ in chunks])
            )
        out: list[str | None] = []
        for s in seqs:
            text = None
            for c, first, count in chunks:
                if first <= s < first + count and stored.get(c) is not None:
                    text = orjson.loads(stored[c])[s - first]
            out.append(text)
        return out


def _save_fits(db: sqlite3.Connection, keys: dict[MemoryKey, _Key], fits: Sequence[Fit]) -> int:
    """Write the fits that win over the stored ones (the catalog holds every key's current fit counters:
    this process is the only writer)."""
    held: dict[MemoryKey, KeyHead] = {}
    rows = []
    for fit in fits:
        entry = keys.get(fit.key)
        if entry is None or not held.get(fit.key, entry).admits(fit.fit_start, fit.fitted_upto):
            continue
        held[fit.key] = KeyHead(entry.start, entry.n, fit.fit_start, fit.fitted_upto)
        rows.append((entry.key_id, fit.fit_start, fit.fitted_upto, fit.labels.astype("<i4").tobytes()))
    if rows:
        db.executemany("INSERT OR REPLACE INTO fits(key_id, fit_start, fitted_upto, labels) VALUES(?, ?, ?, ?)", rows)
    return len(rows)


def _add_step_column(db: sqlite3.Connection) -> None:
    """Stores written before steps were kept lack the column: add it (their chunks' steps stay NULL)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
    if "step" not in columns:
        db.execute("ALTER TABLE chunks ADD COLUMN step INTEGER")


def _add_texts_column(db: sqlite3.Connection) -> None:
    """Rollout texts (optional, per run) live beside the vectors of their chunk; older stores gain the column."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(chunks)")}
    if "texts" not in columns:
        db.execute("ALTER TABLE chunks ADD COLUMN texts BLOB")


def _where_in(db: sqlite3.Connection, sql: str, ids: list[int]) -> list[tuple[Any, ...]]:
    """Run `sql`, whose `IN ({})` takes the ids, in parts under SQLite's parameter limit; the rows of all parts."""
    rows: list[tuple[Any, ...]] = []
    for lo in range(0, len(ids), _SQL_VARS):
        part = ids[lo : lo + _SQL_VARS]
        rows.extend(db.execute(sql.format(",".join("?" * len(part))), part).fetchall())
    return rows


def _join_chunks(entry: _Key, blobs: list[tuple[int, bytes]], first: int, dim: int) -> np.ndarray:
    """The key's vectors with sequence numbers first..n from its chunks' blobs."""
    first_of = dict(zip(entry.chunk_ids, entry.firsts, strict=True))
    parts = sorted((first_of[chunk_id], blob) for chunk_id, blob in blobs)
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    rows = np.concatenate([np.frombuffer(blob, dtype="<f4").reshape(-1, dim) for _, blob in parts])
    return np.ascontiguousarray(rows[first - parts[0][0] :], dtype=np.float32)


# Faults that pass (a disk freed, a lock released, a filesystem remounted): how long to wait before a retry.
_RETRY_AFTER_S = {
    sqlite3.SQLITE_FULL: 5.0,
    sqlite3.SQLITE_IOERR: 5.0,
    sqlite3.SQLITE_READONLY: 5.0,
    sqlite3.SQLITE_BUSY: 1.0,
    sqlite3.SQLITE_LOCKED: 1.0,
}


def _unavailable(what: str, exc: sqlite3.Error) -> StoreUnavailable:
    """503 + Retry-After for every SQLite fault: disk full, read-only, I/O error, locked."""
    code = getattr(exc, "sqlite_errorcode", None)
    retry_after = _RETRY_AFTER_S.get(code & 0xFF, 1.0) if isinstance(code, int) else 1.0
    return StoreUnavailable(f"{what}: {exc}", retry_after=retry_after)
