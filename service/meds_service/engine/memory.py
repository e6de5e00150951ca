"""ErrorMemory: owns the runs' memories and scores batches against them (DESIGN §2, §4).

For each run the engine keeps a cache of every key's counters and last fit, and a FAISS shard index of its
normalised vectors; the store stays the record. Scoring a batch reads the keys' state as it was before the
batch, commits the batch to the store, then updates the cache, all under the run's lock, so updates of one
key are atomic and rollouts of one batch never see each other. Refits happen elsewhere (`Refitter`) and
are applied here when they finish; under `consistency="exact"` a score that touches a key with a pending
refit waits for it first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..core import knn
from ..core.clustering import cluster_sizes
from ..core.config import RunConfig
from ..core.errors import InvalidInput, NotFound, StoreUnavailable
from ..core.penalty import NO_CLUSTER, shape
from ..core.preprocess import features, stored_vectors, unit_rows
from ..core.records import KeyHead
from ..core.types import (
    NO_CLUSTER32,
    RESULT_DTYPE,
    STATUSES,
    Fit,
    Group,
    KeyAppend,
    KeyDelta,
    MemoryKey,
    RolloutBatch,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
    ScoreOutcome,
)
from ..storage.index import ShardIndex, gpu_count
from ..storage.snapshot import KeyRows, Snapshot, read_snapshot, write_snapshot
from .ports import EngineObserver, MemoryStore, Refitter

log = logging.getLogger(__name__)

DEFAULT_MAX_DIM = 8192


@dataclass
class CachedKey:
    """A key's counters and last fit: live vectors have sequence numbers start..n."""

    start: int = 0
    n: int = 0
    fit_start: int = 0
    fitted_upto: int = 0
    labels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def live(self) -> int:
        return self.n - self.start

    @property
    def stale(self) -> bool:
        return self.n > 0 and (self.fit_start != self.start or self.fitted_upto != self.n)

    @property
    def has_fit(self) -> bool:
        return self.fitted_upto > max(self.fit_start, self.start)

    def take_fit(self, fit: Fit) -> bool:
        """Adopt a fit unless it is older than the one held."""
        if fit.fitted_upto < self.fitted_upto or fit.fit_start < self.fit_start:
            return False
        self.labels, self.fit_start, self.fitted_upto = fit.labels, fit.fit_start, fit.fitted_upto
        self.sizes = cluster_sizes(fit.labels)
        return True


@dataclass
class RunMemory:
    name: str
    config: RunConfig
    created_at: float
    keys: dict[MemoryKey, CachedKey] = field(default_factory=dict)
    index: ShardIndex | None = None
    rollouts: int = 0
    pending: set[MemoryKey] = field(default_factory=set)
    inflight: dict[MemoryKey, Future[list[Fit]]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    version: int = 0  # bumped by every change of the index, to know when to snapshot it
    snapshot_version: int = -1

    def needs_fit(self, key: MemoryKey, cached: CachedKey) -> bool:
        return cached.stale and key.group in self.config.fitted_groups()

    def refresh_pending(self, key: MemoryKey) -> None:
        cached = self.keys.get(key)
        if cached is not None and self.needs_fit(key, cached):
            self.pending.add(key)
        else:
            self.pending.discard(key)


# Labels of missing neighbours (fewer stored vectors than k): distinct, and larger than any real label, so
# they never win a vote nor break a tie.
_NO_NEIGHBOUR = np.int64(np.iinfo(np.int64).max)


@dataclass(frozen=True)
class _KeyView:
    """What one key's queries are judged against: the fitted, live part of its memory."""

    key: MemoryKey
    lo: int  # index rows lo..hi hold the fitted vectors
    hi: int
    labels: NDArray[np.int64]
    sizes: NDArray[np.int64]

    @classmethod
    def of(cls, key: MemoryKey, cached: CachedKey) -> _KeyView:
        lo_seq = max(cached.fit_start, cached.start)
        labels = cached.labels[lo_seq - cached.fit_start : cached.fitted_upto - cached.fit_start]
        sizes = cached.sizes if len(labels) == len(cached.labels) else cluster_sizes(labels)
        return cls(key, lo_seq - cached.start, cached.fitted_upto - cached.start, labels, sizes)


class _NullObserver:
    def rollouts(self, status: str, count: int) -> None:
        pass

    def penalties(self, values: Sequence[float] | NDArray[np.float64]) -> None:
        pass

    def refit_done(self, keys: int, vectors: int, seconds: float) -> None:
        pass

    def refit_failed(self) -> None:
        pass

    def knn_fallback(self, tier: str) -> None:
        pass


class ErrorMemory:
    """The engine: score batches, apply refits, answer stats. Thread-safe (one lock per run)."""

    def __init__(
        self,
        store: MemoryStore,
        refitter: Refitter,
        *,
        index_device: str = "auto",
        max_dim: int = DEFAULT_MAX_DIM,
        observer: EngineObserver | None = None,
        on_pending: Callable[[], None] | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.snapshot_dir = snapshot_dir
        self.refitter = refitter
        self.index_device = index_device
        self.max_dim = max_dim
        self.observer: EngineObserver = observer or _NullObserver()
        self.on_pending = on_pending or (lambda: None)
        self._runs: dict[str, RunMemory] = {}
        self._runs_lock = threading.Lock()
        self.loaded = False

    # ---- start-up -----------------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """True when other processes write the same store (Redis): then reads sync the keys they touch."""
        return bool(self.store.shared)

    def load(self) -> None:
        """Rebuild the runs' caches: from index snapshots where they are current, from the store otherwise.

        With an exclusive store every key is loaded now; a shared store is read lazily (each replica syncs
        the keys it touches), so only what the snapshots hold is primed.
        """
        for record in self.store.list_runs():
            run = RunMemory(record.name, record.config, record.created_at)
            if record.config.dim is not None:
                run.index = ShardIndex(record.config.feature_dim, self.index_device)
                self._prime(run)
                if not self.shared:
                    self._sync(run, record.config, self.store.list_keys(record.name))
            run.rollouts = 0 if self.shared else self.store.counts(record.name).rollouts
            self._runs[record.name] = run
        self.loaded = True
        if any(run.pending for run in self._runs.values()):
            self.on_pending()

    def _prime(self, run: RunMemory) -> None:
        """Fill the index from the run's snapshot when it is one of this incarnation of the run."""
        if self.snapshot_dir is None or run.index is None:
            return
        snapshot = read_snapshot(self.snapshot_dir, run.name)
        if snapshot is None or snapshot.created_at != run.created_at or snapshot.dim != run.index.dim:
            return
        for rows in snapshot.keys:
            run.keys[rows.key] = CachedKey(start=rows.start, n=rows.n)
            run.index.append(rows.key, rows.rows)
        run.snapshot_version = run.version
        log.info("run %s: %d keys primed from the index snapshot", run.name, len(snapshot.keys))

    def write_snapshots(self) -> int:
        """Write the index of every run that changed since its last snapshot. Returns how many were written."""
        if self.snapshot_dir is None:
            return 0
        written = 0
        for run in self._cached_runs():
            with run.lock:
                if run.index is None or run.version == run.snapshot_version:
                    continue
                version = run.version
                keys = [
                    KeyRows(key, c.start, c.n, run.index.rows(key, 0, c.live).copy())
                    for key, c in run.keys.items()
                    if run.index.count(key) == c.live
                ]
                snapshot = Snapshot(run.name, run.created_at, run.index.dim, keys)
            write_snapshot(self.snapshot_dir, snapshot)
            run.snapshot_version = version
            written += 1
        return written

    @staticmethod
    def _normalised(stored: NDArray[np.float32], config: RunConfig) -> NDArray[np.float32]:
        return unit_rows(features(stored, config.layer_diff)).astype(np.float32)

    # ---- runs ---------------------------------------------------------------------------------------

    def run_names(self) -> list[str]:
        if self.shared:
            return [record.name for record in self.store.list_runs()]
        with self._runs_lock:
            return sorted(self._runs)

    def _run(self, name: str, *, create: bool = False) -> RunMemory:
        """The run's memory; with a shared store, checked against the store (another process may have
        created, changed or deleted it)."""
        with self._runs_lock:
            run = self._runs.get(name)
            if self.shared:
                record = self.store.get_run(name)
                if record is None and create:
                    record = self.store.save_run(name, RunConfig())
                if record is None:
                    self._runs.pop(name, None)
                    raise NotFound(f"run {name!r} does not exist")
                if run is None or run.created_at != record.created_at:  # new, or deleted and created again
                    run = self._runs[name] = RunMemory(name, record.config, record.created_at)
                run.config = record.config
            elif run is None:
                if not create:
                    raise NotFound(f"run {name!r} does not exist")
                record = self.store.save_run(name, RunConfig())
                run = self._runs[name] = RunMemory(name, record.config, record.created_at)
        return run

    def _run_or_create(self, name: str) -> RunMemory:
        return self._run(name, create=True)

    def config(self, name: str) -> RunConfig:
        return self._run(name).config

    def put_config(self, name: str, patch: dict[str, Any]) -> tuple[RunConfig, bool]:
        """Create a run or update its config; returns (config, created). 409 if it would alter results."""
        with self._runs_lock:
            exists = (self.store.get_run(name) is not None) if self.shared else name in self._runs
            if not exists:
                config = RunConfig.from_mapping(patch)
                self._check_dim(config.dim)
                record = self.store.save_run(name, config)
                self._runs[name] = RunMemory(name, config, record.created_at)
                return config, True
        run = self._run(name)
        with run.lock:
            self._ensure_alive(run)
            has_memory = self.store.counts(name).keys > 0 if self.shared else bool(run.keys)
            config = run.config.updated(patch, has_memory=has_memory)
            self._check_dim(config.dim)
            if config != run.config:
                self.store.save_run(name, config)
                run.config = config
                for key in run.keys:
                    run.refresh_pending(key)
                if run.pending:
                    self.on_pending()
            return config, False

    def delete(self, name: str) -> None:
        with self._runs_lock:
            run = self._runs.get(name)
            if self.shared:
                self._runs.pop(name, None)
                if not self.store.delete_run(name):
                    raise NotFound(f"run {name!r} does not exist")
                return
            if run is None:
                raise NotFound(f"run {name!r} does not exist")
            with run.lock:
                self.store.delete_run(name)
                del self._runs[name]

    def _cached_runs(self) -> list[RunMemory]:
        with self._runs_lock:
            return list(self._runs.values())

    def _ensure_alive(self, run: RunMemory) -> None:
        with self._runs_lock:
            if self._runs.get(run.name) is not run:
                raise NotFound(f"run {run.name!r} was deleted")

    def _check_dim(self, dim: int | None) -> None:
        if dim is not None and dim > self.max_dim:
            raise InvalidInput(f"dim {dim} is over the limit of {self.max_dim} (MEDS_MAX_DIM)")

    # ---- scoring ------------------------------------------------------------------------------------

    def score(self, name: str, batch: RolloutBatch) -> ScoreOutcome:
        """Score a batch against the memory as it was before it, remember it, and return results in order."""
        run = self._run_or_create(name)
        with run.lock:
            self._ensure_alive(run)
            config = self._config_for(run, batch)
            with self.store.locked(name, batch.prompt_ids):
                if self.shared:
                    self._sync(run, config, _group_rows(batch, np.flatnonzero(batch.has_fingerprint)).keys)
                known = self.store.find_results(name, batch.prompt_ids, batch.rollout_ids)
                fresh = np.array([rid not in known for rid in batch.rollout_ids], dtype=bool)
                rows = np.flatnonzero(fresh & batch.has_fingerprint)
                records = np.empty(len(rows), dtype=RESULT_DTYPE)
                if len(rows):
                    scored, normed = self._score_rows(run, config, batch, rows, records)
                    self.store.commit(name, config, scored)
                    self._remember(run, config, scored, normed)
        outcome = self._assemble(batch, known, rows, records)
        self._observe(outcome, records)
        return outcome

    def _sync(self, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]) -> None:
        """Bring the cache of these keys up to the store: what other processes stored, or what a snapshot
        (or nothing) left out at start."""
        if config.dim is None:
            return
        since = {}
        for key in keys:
            cached = run.keys.get(key)
            since[key] = (
                KeyHead(cached.start, cached.n, cached.fit_start, cached.fitted_upto) if cached else KeyHead(0, 0, 0, 0)
            )
        if not since:
            return
        if run.index is None:
            run.index = ShardIndex(config.feature_dim, self.index_device)
        changes = self.store.load_changes(run.name, since, config.stored_dim)
        # A cache that is ahead of the store or has a gap (a stale snapshot, memory evicted past it) is
        # rebuilt from the store.
        stale = {k: KeyHead(0, 0, 0, 0) for k, d in changes.items() if k in run.keys and not _continues(run.keys[k], d)}
        if stale:
            changes.update(self.store.load_changes(run.name, stale, config.stored_dim))
        for key, delta in changes.items():
            if key in stale:
                run.index.remove(key)
                del run.keys[key]
            if delta.n == 0:
                continue
            cached = run.keys.get(key)
            if cached is None:
                cached = run.keys[key] = CachedKey(start=delta.start, n=delta.start)
            if len(delta.vectors):
                run.index.append(key, self._normalised(delta.vectors, config))
                cached.n = delta.n
            if delta.start > cached.start:
                run.index.drop_front(key, delta.start - cached.start)
                cached.start = delta.start
            if delta.fit is not None:
                cached.take_fit(Fit(key, delta.fit[2], delta.fit[0], delta.fit[1]))
            run.refresh_pending(key)
        run.version += 1

    def _config_for(self, run: RunMemory, batch: RolloutBatch) -> RunConfig:
        """The run's config, with `dim` fixed by this batch's fingerprints when it was still open."""
        config = run.config
        if not batch.has_fingerprint.any():
            return config
        dim = batch.fingerprints.shape[1]
        if config.dim is None:
            self._check_dim(dim)
            config.check_fingerprint_length(dim, run.name)
            return config.with_dim(dim)
        if dim != config.dim:
            raise InvalidInput(f"fingerprints have {dim} values but run {run.name!r} expects {config.dim}")
        return config

    def _score_rows(
        self,
        run: RunMemory,
        config: RunConfig,
        batch: RolloutBatch,
        rows: NDArray[np.intp],
        records: NDArray[np.void],
    ) -> tuple[ScoredBatch, list[NDArray[np.float32]]]:
        """Fill `records` for the rollouts at `rows`; return the batch to commit and each append's
        normalised vectors (for the index once committed).

        The work runs on the rows sorted by key, so that each key's rollouts are one contiguous slice.
        """
        groups = _group_rows(batch, rows)
        by_key = rows[groups.order]
        stored = stored_vectors(batch.fingerprints[by_key], config)
        feats = features(stored, config.layer_diff)
        normed = unit_rows(feats).astype(np.float32)
        if config.consistency == "exact":
            self._refit_touched(run, config, groups.keys)
        predicted, sizes = self._assign(run, config, groups, normed, feats)
        out_sizes, penalties, shaped = shape(batch.groups[by_key], predicted, sizes, batch.rewards[by_key], config)
        sorted_records = np.empty(len(rows), dtype=RESULT_DTYPE)
        sorted_records["cluster"] = np.where(predicted == NO_CLUSTER, NO_CLUSTER32, predicted)
        sorted_records["size"] = out_sizes
        sorted_records["penalty"] = penalties
        sorted_records["shaped"] = shaped
        records[groups.order] = sorted_records
        ids = [batch.rollout_ids[r] for r in by_key.tolist()]
        appends, fits = self._appends(run, config, groups, stored, ids, sorted_records)
        fitted = config.fitted_groups()
        refits = [a.key for a in appends if a.key.group in fitted and len(a.vectors) + a.first_seq - a.new_start >= 2]
        return ScoredBatch(appends, fits, refits), [normed[lo:hi] for _, lo, hi in groups.spans()]

    def _assign(
        self,
        run: RunMemory,
        config: RunConfig,
        groups: _Groups,
        queries: NDArray[np.float32],
        query_features: NDArray[np.float64],
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Predicted label and cluster size of every query (NO_CLUSTER where its key has no fit yet).

        One FAISS search per key fills a [queries, k+1] table of similarities and neighbour labels; the
        certainty test and the vote then run on the whole table at once (see core/knn.py for the proof).
        Queries come sorted by key: each key fills one contiguous block of the table.
        """
        n, k = len(queries), config.knn_k
        predicted = np.full(n, NO_CLUSTER, dtype=np.int64)
        sizes = np.zeros(n, dtype=np.int64)
        if run.index is None:
            return predicted, sizes
        scores = np.full((n, k + 1), -np.inf, dtype=np.float32)
        neighbours = np.repeat(_NO_NEIGHBOUR - np.arange(k, dtype=np.int64)[None, :], n, axis=0)
        size_of = np.zeros(n, dtype=np.int64)  # offset of the row's key in `all_sizes`
        k_eff = np.zeros(n, dtype=np.int64)
        searchable = np.zeros(n, dtype=np.int64)
        key_of = np.full(n, -1, dtype=np.int64)
        views: list[_KeyView] = []
        size_parts: list[NDArray[np.int64]] = []
        size_offset = 0
        fitted = config.fitted_groups()
        for key, lo, hi in groups.spans():
            cached = run.keys.get(key)
            if cached is None or key.group not in fitted or not cached.has_fit:
                continue
            view = _KeyView.of(key, cached)
            found, ids = run.index.search(key, view.lo, view.hi, queries[lo:hi], k + 1)
            m = view.hi - view.lo
            top = min(k, m)
            scores[lo:hi, : found.shape[1]] = found
            neighbours[lo:hi, :top] = view.labels[ids[:, :top]]
            k_eff[lo:hi], searchable[lo:hi], key_of[lo:hi], size_of[lo:hi] = top, m, len(views), size_offset
            views.append(view)
            size_parts.append(view.sizes)
            size_offset += len(view.sizes)
        rows = np.flatnonzero(key_of >= 0)
        if not len(rows):
            return predicted, sizes
        bound = knn.float32_bound(run.index.dim, run.index.rounding_safety)
        kk = k_eff[rows]
        gap = scores[rows, kk - 1].astype(np.float64) - scores[rows, np.minimum(kk, k)].astype(np.float64)
        sure = (searchable[rows] <= kk) | (gap > 2 * bound)
        predicted[rows[sure]] = knn.vote(neighbours[rows[sure]])
        unsure = rows[~sure]
        for view_index in np.unique(key_of[unsure]).tolist():
            mine = unsure[key_of[unsure] == view_index]
            predicted[mine] = self._near_ties(run, config, views[view_index], queries[mine], query_features[mine])
        all_sizes = np.concatenate(size_parts)
        sizes[rows] = all_sizes[size_of[rows] + predicted[rows] + 1]
        return predicted, sizes

    def _near_ties(
        self,
        run: RunMemory,
        config: RunConfig,
        view: _KeyView,
        queries: NDArray[np.float32],
        query_features: NDArray[np.float64],
    ) -> NDArray[np.int64]:
        """Queries of one key whose float32 neighbour sets are not provably the reference's: decide them in
        float64 (one matrix product for the key), and the true near-ties by the reference computation."""
        assert run.index is not None
        similarities = run.index.rows(view.key, view.lo, view.hi).astype(np.float64) @ queries.astype(np.float64).T
        bound = knn.float64_bound(run.index.dim)
        labels = np.empty(len(queries), dtype=np.int64)
        history: NDArray[np.float64] | None = None
        for q in range(len(queries)):
            label = knn.band_vote(similarities[:, q], view.labels, config.knn_k, bound)
            if label is not None:
                self.observer.knn_fallback("float64")
                labels[q] = label
                continue
            self.observer.knn_fallback("reference")
            if history is None:
                state = self.store.load_keys(run.name, [view.key], config.stored_dim)[view.key]
                history = features(state.vectors[view.lo : view.hi], config.layer_diff)
            labels[q] = knn.reference_vote(history, view.labels, query_features[q], config.knn_k)
        return labels

    def _appends(
        self,
        run: RunMemory,
        config: RunConfig,
        groups: _Groups,
        stored: NDArray[np.float32],
        rollout_ids: list[str],
        records: NDArray[np.void],
    ) -> tuple[list[KeyAppend], list[Fit]]:
        """One append per key: slices (not copies) of the key-sorted vectors, ids and results."""
        appends, fits = [], []
        cap = config.max_memory_per_key
        for key, lo, hi in groups.spans():
            cached = run.keys.get(key) or CachedKey()
            n_new = cached.n + hi - lo
            new_start = max(cached.start, n_new - cap) if cap else cached.start
            appends.append(KeyAppend(key, cached.n, stored[lo:hi], new_start, rollout_ids[lo:hi], records[lo:hi]))
            if n_new - new_start < 2:  # HDBSCAN needs two points: such a key's labels are all noise
                fits.append(Fit(key, np.full(n_new - new_start, -1, np.int64), new_start, n_new))
        return appends, fits

    def _remember(
        self, run: RunMemory, config: RunConfig, scored: ScoredBatch, normed: list[NDArray[np.float32]]
    ) -> None:
        """Mirror a committed batch into the cache and the index."""
        if run.index is None:
            run.index = ShardIndex(config.feature_dim, self.index_device)
        run.config = config
        for append, vectors in zip(scored.appends, normed, strict=True):
            cached = run.keys.setdefault(append.key, CachedKey())
            run.index.append(append.key, vectors)
            cached.n = append.first_seq + len(append.vectors)
            if append.new_start > cached.start:
                run.index.drop_front(append.key, append.new_start - cached.start)
                cached.start = append.new_start
        for fit in scored.fits:
            run.keys[fit.key].take_fit(fit)
        for append in scored.appends:
            run.refresh_pending(append.key)
        run.rollouts += sum(len(a.rollout_ids) for a in scored.appends)
        run.version += 1
        if run.pending:
            self.on_pending()

    @staticmethod
    def _assemble(
        batch: RolloutBatch, known: dict[str, RolloutResult], rows: NDArray[np.intp], scored: NDArray[np.void]
    ) -> ScoreOutcome:
        n = len(batch)
        status = np.full(n, STATUSES.index(RolloutStatus.SKIPPED), dtype=np.int8)
        records = np.zeros(n, dtype=RESULT_DTYPE)
        records["cluster"] = NO_CLUSTER32
        records["shaped"] = batch.rewards  # skipped rollouts: penalty 0, reward unchanged
        status[rows] = STATUSES.index(RolloutStatus.SCORED)
        records[rows] = scored
        if known:
            for i, rid in enumerate(batch.rollout_ids):
                first = known.get(rid)
                if first is not None:
                    status[i] = STATUSES.index(RolloutStatus.DUPLICATE)
                    records[i] = (
                        NO_CLUSTER32 if first.cluster is None else first.cluster,
                        first.cluster_size,
                        first.penalty,
                        np.nan if first.shaped_reward is None else first.shaped_reward,
                    )
        return ScoreOutcome(batch.rollout_ids, status, records)

    def _observe(self, outcome: ScoreOutcome, scored: NDArray[np.void]) -> None:
        counts = np.bincount(outcome.status, minlength=len(STATUSES))
        for status, count in zip(STATUSES, counts.tolist(), strict=True):
            if count:
                self.observer.rollouts(status.value, count)
        self.observer.penalties(scored["penalty"])

    # ---- refits -------------------------------------------------------------------------------------

    def _refit_touched(self, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]) -> None:
        """The `exact` rule: keys this batch reads must have a fit of all their vectors first."""
        due = [k for k in keys if k in run.pending]
        rounds = 0
        while due:
            rounds += 1
            if rounds > 3:
                raise StoreUnavailable("refits of this batch's keys keep going stale; retry", retry_after=1)
            waits = {id(f): f for k in due if (f := run.inflight.get(k)) is not None}
            fresh = [k for k in due if k not in run.inflight]
            if fresh:
                future = self._submit(run, config, fresh)
                waits[id(future)] = future
            for future in waits.values():
                self._apply(run, future)
            due = [k for k in due if k in run.pending]

    def _submit(self, run: RunMemory, config: RunConfig, keys: Sequence[MemoryKey]) -> Future[list[Fit]]:
        future = self.refitter.submit(run.name, config, keys)
        started = time.perf_counter()
        future.add_done_callback(lambda f: setattr(f, "meds_seconds", time.perf_counter() - started))
        future.add_done_callback(lambda _: self.on_pending())
        for key in keys:
            run.inflight[key] = future
        return future

    def _apply(self, run: RunMemory, future: Future[list[Fit]]) -> None:
        """Wait for a refit job and adopt its labels (store first, then cache). Caller holds the run lock."""
        try:
            fits = future.result()
        except Exception:
            log.exception("refit of run %s failed", run.name)
            self.observer.refit_failed()
            fits = []
        for key in [k for k, f in run.inflight.items() if f is future]:
            del run.inflight[key]
        with self._runs_lock:
            alive = self._runs.get(run.name) is run
        if not fits or not alive:
            return
        self.store.save_fits(run.name, fits)
        for fit in fits:
            if fit.key in run.keys:
                run.keys[fit.key].take_fit(fit)
                run.refresh_pending(fit.key)
        seconds = getattr(future, "meds_seconds", 0.0)
        self.observer.refit_done(len(fits), sum(len(f.labels) for f in fits), seconds)

    def schedule_refits(self, max_jobs: int, max_keys_per_job: int, max_vectors_per_job: int) -> int:
        """Background scheduling: submit pending keys not yet in flight, batched. Returns jobs submitted."""
        submitted = 0
        for run in self._cached_runs():
            with run.lock:
                todo = [k for k in run.pending if k not in run.inflight]
                for job in _batches(todo, run, max_keys_per_job, max_vectors_per_job):
                    if submitted >= max_jobs:
                        return submitted
                    self._submit(run, run.config, job)
                    submitted += 1
        return submitted

    def reap_refits(self, block: bool = False) -> int:
        """Adopt the results of finished background refit jobs. Returns jobs applied."""
        applied = 0
        for run in self._cached_runs():
            with run.lock:
                futures = {id(f): f for f in run.inflight.values() if block or f.done()}
                for future in futures.values():
                    self._apply(run, future)
                    applied += 1
        return applied

    def inflight_jobs(self) -> int:
        jobs: set[int] = set()
        for run in self._cached_runs():
            jobs.update(id(f) for f in list(run.inflight.values()))
        return len(jobs)

    def recluster(self, name: str, everything: bool = False) -> dict[str, Any]:
        """Refit now: the pending keys (or every key) of a run, in parallel, and answer when done."""
        run = self._run(name)
        started = time.perf_counter()
        with run.lock:
            if self.shared:
                heads = self.store.key_heads(name)
                keys = list(heads) if everything else self.store.list_keys(name, pending_only=True)
                vectors = sum(heads[k].live for k in keys if k in heads)
            else:
                keys = list(run.keys) if everything else sorted(run.pending)
                vectors = sum(run.keys[k].live for k in keys)
            for key in keys:
                if key in run.inflight:
                    self._apply(run, run.inflight[key])
            jobs = [self._submit(run, run.config, job) for job in split_keys(keys, self.refitter.workers)]
            for future in jobs:
                self._apply(run, future)
        return {
            "run": name,
            "refitted_keys": len(keys),
            "vectors": vectors,
            "seconds": round(time.perf_counter() - started, 6),
        }

    # ---- views --------------------------------------------------------------------------------------

    def stats(self, name: str) -> dict[str, Any]:
        run = self._run(name)
        with run.lock:
            if self.shared:
                counts = self.store.counts(name)
                keys, vectors, rollouts = counts.keys, counts.vectors, counts.rollouts
                pending = self.store.pending_count(name)
            else:
                keys, vectors, rollouts = len(run.keys), sum(c.live for c in run.keys.values()), run.rollouts
                pending = len(run.pending)
            return {
                "keys": keys,
                "vectors": vectors,
                "pending_refits": pending,
                "refits_in_flight": len(set(map(id, run.inflight.values()))),
                "rollouts": rollouts,
                "dim": run.config.dim,
                "index_device": run.index.device if run.index else self._device_name(),
            }

    def _device_name(self) -> str:
        return "cuda" if self.index_device != "cpu" and gpu_count() > 0 else "cpu"

    def created_at(self, name: str) -> float:
        return self._run(name).created_at

    def prompt(self, name: str, prompt_id: str) -> dict[str, Any]:
        run = self._run(name)
        groups: dict[str, Any] = {}
        with run.lock:
            if self.shared:
                self._sync(run, run.config, [MemoryKey(prompt_id, g) for g in Group])
            for group in Group:
                cached = run.keys.get(MemoryKey(prompt_id, group))
                if cached is None:
                    continue
                labels = cached.labels
                values, counts = np.unique(labels, return_counts=True)
                groups[group.wire] = {
                    "vectors": cached.live,
                    "fitted": cached.fitted_upto - cached.fit_start,
                    "pending_refit": MemoryKey(prompt_id, group) in run.pending,
                    "clusters": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
                    "labels": labels.tolist(),
                }
        if not groups:
            raise NotFound(f"run {name!r} has no memory of prompt {prompt_id!r}")
        return {"prompt_id": prompt_id, "groups": groups}

    def totals(self) -> dict[str, int]:
        """Across runs, for the metrics gauges."""
        keys = vectors = pending = 0
        names = self.run_names()
        if self.shared:
            for name in names:
                counts = self.store.counts(name)
                keys, vectors = keys + counts.keys, vectors + counts.vectors
                pending += self.store.pending_count(name)
        else:
            for run in self._cached_runs():
                keys += len(run.keys)
                vectors += sum(c.live for c in list(run.keys.values()))
                pending += len(run.pending)
        return {
            "runs": len(names),
            "keys": keys,
            "vectors": vectors,
            "pending_refits": pending,
            "refits_in_flight": self.inflight_jobs(),
        }


def _continues(cached: CachedKey, delta: KeyDelta) -> bool:
    """Whether the store's view of a key extends the cached one (else the cache is rebuilt)."""
    return delta.n >= cached.n and delta.first == cached.n and delta.start >= cached.start


@dataclass(frozen=True)
class _Groups:
    """A batch's rows grouped by memory key: `order` sorts positions (into `rows`) by key, stably, so that
    key i owns order[starts[i]:starts[i + 1]]; keys in order of first appearance."""

    keys: list[MemoryKey]
    order: NDArray[np.intp]
    starts: list[int]

    def spans(self) -> Iterator[tuple[MemoryKey, int, int]]:
        return zip(self.keys, self.starts[:-1], self.starts[1:], strict=True)


def _group_rows(batch: RolloutBatch, rows: NDArray[np.intp]) -> _Groups:
    prompt_ids, groups = batch.prompt_ids, batch.groups.tolist()
    first: dict[tuple[str, int], int] = {}
    codes = np.fromiter(
        (first.setdefault((prompt_ids[row], groups[row]), len(first)) for row in rows.tolist()),
        dtype=np.intp,
        count=len(rows),
    )
    order = np.argsort(codes, kind="stable")
    starts = [0, *np.cumsum(np.bincount(codes, minlength=len(first))).tolist()]
    return _Groups([MemoryKey(p, Group(g)) for p, g in first], order, starts)


def _batches(keys: list[MemoryKey], run: RunMemory, max_keys: int, max_vectors: int) -> Iterable[list[MemoryKey]]:
    job: list[MemoryKey] = []
    vectors = 0
    for key in keys:
        size = run.keys[key].live
        if job and (len(job) >= max_keys or vectors + size > max_vectors):
            yield job
            job, vectors = [], 0
        job.append(key)
        vectors += size
    if job:
        yield job


def split_keys(keys: list[MemoryKey], parts: int) -> list[list[MemoryKey]]:
    """Keys dealt round-robin into at most `parts` jobs (none when there are no keys)."""
    parts = max(1, min(parts, len(keys)))
    return [keys[i::parts] for i in range(parts)] if keys else []
