"""ErrorMemory: owns the runs' memories and scores batches against them (docs/architecture.md, "The
algorithm" and "A score request").

For each run the engine keeps a cache of every key's counters and last fit, and a kNN index of its
normalised vectors (engine/cache.py); the store stays the record. Scoring a batch reads the keys' state as it
was before the batch, commits the batch to the store, then updates the cache, all under the run's lock, so
updates of one key are atomic and rollouts of one batch never see each other. Refits happen elsewhere
(engine/refits.py) and are applied when they finish. Whether other processes write the same store is the
Coordination port's business (engine/coordination.py); this module has one code path for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..core.config import RunConfig
from ..core.errors import InvalidInput, NotFound
from ..core.penalty import NO_CLUSTER, shape
from ..core.preprocess import features, stored_vectors, unit_rows
from ..core.texts import kept_texts
from ..core.types import (
    NO_CLUSTER32,
    RESULT_DTYPE,
    STATUSES,
    Fit,
    Group,
    KeyAppend,
    KeyRows,
    MemoryKey,
    RolloutBatch,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
    ScoreOutcome,
    Snapshot,
    rollout_hashes,
)
from .assign import predict
from .cache import CachedKey, Groups, KeyView, RunMemory, group_rows
from .coordination import coordination_for
from .ports import EngineObserver, MemoryStore, NullObserver, Refitter, SnapshotStore, VectorIndexes
from .refits import Refits
from .summary import with_metrics
from .views import MemoryTotals, PromptView, ReclusterReport, RunStats, group_view

log = logging.getLogger(__name__)

DEFAULT_MAX_DIM = 8192


class ErrorMemory:
    """The engine: score batches, apply refits, answer stats. Thread-safe (one lock per run)."""

    def __init__(
        self,
        store: MemoryStore,
        refitter: Refitter,
        *,
        indexes: VectorIndexes,
        snapshots: SnapshotStore | None = None,
        max_dim: int = DEFAULT_MAX_DIM,
        observer: EngineObserver | None = None,
        on_pending: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.indexes = indexes
        self.snapshots = snapshots
        self.max_dim = max_dim
        self.observer: EngineObserver = observer or NullObserver()
        self.on_pending = on_pending or (lambda: None)
        self.coordination = coordination_for(store, indexes)
        self.refits = Refits(store, refitter, self.coordination, self.observer, lambda: self.on_pending())
        self.loaded = False

    # ---- start-up and snapshots ---------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild the runs' caches: from index snapshots where they are current, then as the coordination
        says (every key now when this process is the only writer, lazily otherwise)."""
        for run in self.coordination.load():
            if run.config.dim is not None:
                run.index_for(run.config, self.indexes)
                self._prime(run)
            self.coordination.fill(run)
        self.loaded = True
        if any(run.pending for run in self.coordination.cached()):
            self.on_pending()

    def _prime(self, run: RunMemory) -> None:
        """Fill the index from the run's snapshot when it is one of this incarnation of the run."""
        if self.snapshots is None or run.index is None:
            return
        snapshot = self.snapshots.read(run.name)
        if snapshot is None or snapshot.created_at != run.created_at or snapshot.dim != run.index.dim:
            return
        for rows in snapshot.keys:
            run.keys[rows.key] = CachedKey(start=rows.start, n=rows.n)
            run.index.append(rows.key, rows.rows)
        run.snapshot_version = run.version
        log.info("run %s: %d keys primed from the index snapshot", run.name, len(snapshot.keys))

    def write_snapshots(self) -> int:
        """Write the index of every run that changed since its last snapshot. Returns how many were written."""
        if self.snapshots is None:
            return 0
        written = 0
        for run in self.coordination.cached():
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
            self.snapshots.write(snapshot)
            run.snapshot_version = version
            written += 1
        return written

    # ---- runs ---------------------------------------------------------------------------------------

    def run_names(self) -> list[str]:
        return self.coordination.names()

    def config(self, name: str) -> RunConfig:
        return self.coordination.run(name).config

    def created_at(self, name: str) -> float:
        return self.coordination.run(name).created_at

    def put_config(self, name: str, patch: Mapping[str, Any]) -> tuple[RunConfig, bool]:
        """Create a run or update its config; returns (config, created). 409 if it would alter results."""

        def first_config() -> RunConfig:
            config = RunConfig.from_mapping(patch)
            self._check_dim(config.dim)
            return config

        created = self.coordination.create(name, first_config)
        if created is not None:
            return created.config, True
        run = self.coordination.run(name)
        with run.lock:
            self._ensure_alive(run)
            config = run.config.updated(patch, has_memory=self.coordination.has_memory(run))
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
        self.coordination.delete(name)
        self.observer.run_deleted(name)

    def _ensure_alive(self, run: RunMemory) -> None:
        if not self.coordination.alive(run):
            raise NotFound(f"run {run.name!r} was deleted")

    def _check_dim(self, dim: int | None) -> None:
        if dim is not None and dim > self.max_dim:
            raise InvalidInput(f"dim {dim} is over the limit of {self.max_dim} (MEDS_MAX_DIM)")

    # ---- scoring ------------------------------------------------------------------------------------

    def score(self, name: str, batch: RolloutBatch) -> ScoreOutcome:
        """Score a batch against the memory as it was before it, remember it, and return results in order."""
        run = self.coordination.run(name, create=True)
        with run.lock:
            self._ensure_alive(run)
            config = self._config_for(run, batch)
            with self.coordination.locked(name, batch.prompt_ids):
                self.coordination.refresh(run, config, _touched(batch))
                hashes = rollout_hashes(batch.prompt_ids, batch.rollout_ids) if self.store.finds_ids_by_hash else None
                known = self.store.find_results(name, batch.prompt_ids, batch.rollout_ids, hashes)
                fresh = np.array([rid not in known for rid in batch.rollout_ids], dtype=bool)
                rows = np.flatnonzero(fresh & batch.has_fingerprint)
                records = np.empty(len(rows), dtype=RESULT_DTYPE)
                if len(rows):
                    scored, normed = self._score_rows(run, config, batch, rows, records, hashes)
                    self.store.commit(name, config, scored)
                    self._remember(run, config, scored, normed)
        outcome = _assemble(batch, known, rows, records)
        self._observe(outcome, records)
        return with_metrics(outcome, batch, self.observer, name)

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
        hashes: NDArray[np.uint64] | None,
    ) -> tuple[ScoredBatch, list[NDArray[np.float32]]]:
        """Fill `records` for the rollouts at `rows`; return the batch to commit and each append's
        normalised vectors (for the index once committed).

        The work runs on the rows sorted by key, so that each key's rollouts are one contiguous slice.
        """
        groups = group_rows(batch, rows)
        by_key = rows[groups.order]
        stored = stored_vectors(batch.fingerprints[by_key], config)
        feats = features(stored, config.layer_diff)
        normed = unit_rows(feats).astype(np.float32)
        if config.consistency == "exact":
            self.refits.wait_for(run, config, groups.keys)

        def history(view: KeyView) -> NDArray[np.float64]:
            state = self.store.load_keys(run.name, [view.key], config.stored_dim)[view.key]
            return features(state.vectors[view.lo : view.hi], config.layer_diff)

        predicted, sizes = predict(run.index, run.keys, config, groups, normed, feats, history, self.observer)
        out_sizes, penalties, shaped = shape(batch.groups[by_key], predicted, sizes, batch.rewards[by_key], config)
        sorted_records = np.empty(len(rows), dtype=RESULT_DTYPE)
        sorted_records["cluster"] = np.where(predicted == NO_CLUSTER, NO_CLUSTER32, predicted)
        sorted_records["size"] = out_sizes
        sorted_records["penalty"] = penalties
        sorted_records["shaped"] = shaped
        records[groups.order] = sorted_records
        ids = [batch.rollout_ids[r] for r in by_key.tolist()]
        texts = kept_texts(batch.texts, by_key, config.text_max_chars)
        appends, fits = _appends(run, config, groups, stored, ids, sorted_records, batch.step, texts)
        fitted = config.fitted_groups()
        refits = [a.key for a in appends if a.key.group in fitted and len(a.vectors) + a.first_seq - a.new_start >= 2]
        scored = ScoredBatch(appends, fits, refits, None if hashes is None else hashes[by_key])
        return scored, [normed[lo:hi] for _, lo, hi in groups.spans()]

    def _remember(
        self, run: RunMemory, config: RunConfig, scored: ScoredBatch, normed: list[NDArray[np.float32]]
    ) -> None:
        """Mirror a committed batch into the cache and the index."""
        index = run.index_for(config, self.indexes)
        run.config = config
        held = run.keys
        for append, vectors in zip(scored.appends, normed, strict=True):
            key = append.key
            cached = held.get(key)
            if cached is None:
                cached = held[key] = CachedKey()
            index.append(key, vectors)
            cached.n = append.first_seq + len(vectors)
            if append.new_start > cached.start:
                index.drop_front(key, append.new_start - cached.start)
                cached.start = append.new_start
        for fit in scored.fits:
            held[fit.key].take_fit(fit)
        run.refresh_pending_keys(append.key for append in scored.appends)
        run.rollouts += sum(len(a.rollout_ids) for a in scored.appends)
        run.version += 1
        if run.pending:
            self.on_pending()

    def _observe(self, outcome: ScoreOutcome, scored: NDArray[np.void]) -> None:
        counts = np.bincount(outcome.status, minlength=len(STATUSES))
        for status, count in zip(STATUSES, counts.tolist(), strict=True):
            if count:
                self.observer.rollouts(status.value, count)
        self.observer.penalties(scored["penalty"])

    # ---- refits -------------------------------------------------------------------------------------

    def schedule_refits(self, max_jobs: int, max_keys_per_job: int, max_vectors_per_job: int) -> int:
        return self.refits.schedule(max_jobs, max_keys_per_job, max_vectors_per_job)

    def reap_refits(self, block: bool = False) -> int:
        return self.refits.reap(block)

    def inflight_jobs(self) -> int:
        return self.refits.in_flight()

    def recluster(self, name: str, everything: bool = False) -> ReclusterReport:
        return self.refits.recluster(self.coordination.run(name), everything)

    # ---- views --------------------------------------------------------------------------------------

    def stats(self, name: str) -> RunStats:
        """A run's counts, without its lock: a score holds that lock for a whole batch (refit waits
        included), and stats must answer meanwhile. The counts are read from copies, so they are those of
        a moment, possibly one inside a batch being remembered."""
        run = self.coordination.run(name)
        counts = self.coordination.counts(run)
        index = run.index
        return {
            "keys": counts.keys,
            "vectors": counts.vectors,
            "pending_refits": counts.pending,
            "refits_in_flight": len(run.jobs()),
            "rollouts": counts.rollouts,
            "dim": run.config.dim,
            "index_device": index.device if index else self.indexes.device,
        }

    def prompt(self, name: str, prompt_id: str) -> PromptView:
        """A prompt's memory per group: its last fit's clusters, with the training steps they were seen at."""
        run = self.coordination.run(name)
        keys = [MemoryKey(prompt_id, group) for group in Group]
        with run.lock:
            self.coordination.refresh(run, run.config, keys)
            held = {key: run.keys[key] for key in keys if key in run.keys}
            steps = self.store.load_steps(name, list(held)) if held else {}
            groups = {key.group.wire: group_view(key, cached, steps[key], run) for key, cached in held.items()}
        if not groups:
            raise NotFound(f"run {name!r} has no memory of prompt {prompt_id!r}")
        return {"prompt_id": prompt_id, "groups": groups}

    def totals(self) -> MemoryTotals:
        """Across runs, for the metrics gauges."""
        counts = self.coordination.totals()
        return {
            "runs": len(self.coordination.names()),
            "keys": counts.keys,
            "vectors": counts.vectors,
            "pending_refits": counts.pending,
            "refits_in_flight": self.refits.in_flight(),
        }


def _touched(batch: RolloutBatch) -> Iterator[MemoryKey]:
    """The keys a batch reads, found only when asked for (a local coordination never asks)."""
    yield from group_rows(batch, np.flatnonzero(batch.has_fingerprint)).keys


def _appends(
    run: RunMemory,
    config: RunConfig,
    groups: Groups,
    stored: NDArray[np.float32],
    rollout_ids: list[str],
    records: NDArray[np.void],
    step: int | None,
    texts: list[str | None] | None,
) -> tuple[list[KeyAppend], list[Fit]]:
    """One append per key: slices (not copies) of the key-sorted vectors, ids and results."""
    appends, fits = [], []
    cap = config.max_memory_per_key
    for key, lo, hi in groups.spans():
        cached = run.keys.get(key) or CachedKey()
        n_new = cached.n + hi - lo
        new_start = max(cached.start, n_new - cap) if cap else cached.start
        kept = None if texts is None else texts[lo:hi]
        appends.append(
            KeyAppend(key, cached.n, stored[lo:hi], new_start, rollout_ids[lo:hi], records[lo:hi], step, kept)
        )
        if n_new - new_start < 2:  # HDBSCAN needs two points: such a key's labels are all noise
            fits.append(Fit(key, np.full(n_new - new_start, -1, np.int64), new_start, n_new))
    return appends, fits


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
                records[i] = first.record()
    return ScoreOutcome(batch.rollout_ids, status, records)
