"""The engine's cache of a run: every key's counters and last fit, and the run's kNN index.

The store stays the record; `sync` brings keys of the cache up to it (what other processes stored, or what
a snapshot, or nothing, left out at start).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..core.config import RunConfig
from ..core.penalty import cluster_sizes
from ..core.preprocess import features, unit_rows
from ..core.records import KeyHead
from ..core.types import Fit, Group, KeyDelta, MemoryKey, RolloutBatch
from .ports import MemoryStore, VectorIndex, VectorIndexes


@dataclass
class CachedKey(KeyHead):
    """A key's counters (live vectors have sequence numbers start..n) and the labels of its last fit."""

    labels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))

    def take_fit(self, fit: Fit) -> bool:
        """Adopt a fit unless it is older than the one held."""
        if not self.admits(fit.fit_start, fit.fitted_upto):
            return False
        self.labels, self.fit_start, self.fitted_upto = fit.labels, fit.fit_start, fit.fitted_upto
        self.sizes = cluster_sizes(fit.labels)
        return True


@dataclass
class RefitJob:
    """One submitted refit: its future and when it started and finished (for the refit-time metric)."""

    future: Future[list[Fit]]
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def __post_init__(self) -> None:
        self.future.add_done_callback(self._done)

    def _done(self, _: Future[list[Fit]]) -> None:
        self.finished = time.perf_counter()

    @property
    def seconds(self) -> float:
        return 0.0 if self.finished is None else self.finished - self.started


@dataclass
class RunMemory:
    name: str
    config: RunConfig
    created_at: float
    keys: dict[MemoryKey, CachedKey] = field(default_factory=dict)
    index: VectorIndex | None = None
    rollouts: int = 0
    pending: set[MemoryKey] = field(default_factory=set)
    inflight: dict[MemoryKey, RefitJob] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    version: int = 0  # bumped by every change of the index, to know when to snapshot it
    snapshot_version: int = -1

    def index_for(self, config: RunConfig, indexes: VectorIndexes) -> VectorIndex:
        if self.index is None:
            self.index = indexes.new(config.feature_dim)
        return self.index

    def needs_fit(self, key: MemoryKey, cached: CachedKey) -> bool:
        return cached.stale and key.group in self.config.fitted_groups()

    def refresh_pending(self, key: MemoryKey) -> None:
        self.refresh_pending_keys((key,))

    def refresh_pending_keys(self, keys: Iterable[MemoryKey]) -> None:
        """Mark each key pending a refit, or not, as its counters now say (the run's fitted groups read once)."""
        fitted = self.config.fitted_groups()
        held, pending = self.keys, self.pending
        for key in keys:
            cached = held.get(key)
            if cached is not None and cached.stale and key.group in fitted:
                pending.add(key)
            else:
                pending.discard(key)

    def jobs(self) -> list[RefitJob]:
        """The distinct refit jobs in flight."""
        return list({id(job): job for job in list(self.inflight.values())}.values())


@dataclass(frozen=True)
class KeyView:
    """What one key's queries are judged against: the fitted, live part of its memory."""

    key: MemoryKey
    lo: int  # index rows lo..hi hold the fitted vectors
    hi: int
    labels: NDArray[np.int64]
    sizes: NDArray[np.int64]

    @classmethod
    def of(cls, key: MemoryKey, cached: CachedKey) -> KeyView:
        lo_seq = max(cached.fit_start, cached.start)
        labels = cached.labels[lo_seq - cached.fit_start : cached.fitted_upto - cached.fit_start]
        sizes = cached.sizes if len(labels) == len(cached.labels) else cluster_sizes(labels)
        return cls(key, lo_seq - cached.start, cached.fitted_upto - cached.start, labels, sizes)


@dataclass(frozen=True)
class Groups:
    """A batch's rows grouped by memory key: `order` sorts positions (into `rows`) by key, stably, so that
    key i owns order[starts[i]:starts[i + 1]]; keys in order of first appearance."""

    keys: list[MemoryKey]
    order: NDArray[np.intp]
    starts: list[int]

    def spans(self) -> Iterator[tuple[MemoryKey, int, int]]:
        return zip(self.keys, self.starts[:-1], self.starts[1:], strict=True)


_GROUPS = tuple(Group(value) for value in range(len(Group)))  # by value: _GROUPS[g] is Group(g)


def group_rows(batch: RolloutBatch, rows: NDArray[np.intp]) -> Groups:
    if not len(rows):
        return Groups([], np.zeros(0, dtype=np.intp), [0])
    # Prompts get codes in order of first appearance through C-level dict and map calls (no Python loop per
    # rollout); a key's code is prompt code * groups + group, renumbered by first appearance.
    prompts = [batch.prompt_ids[row] for row in rows.tolist()] if len(rows) != len(batch) else batch.prompt_ids
    firsts = list(dict.fromkeys(prompts))
    code_of = dict(zip(firsts, range(len(firsts)), strict=True))
    prompt_codes = np.fromiter(map(code_of.__getitem__, prompts), dtype=np.intp, count=len(rows))
    key_codes = prompt_codes * len(_GROUPS) + batch.groups[rows]
    unique, first_at, inverse = np.unique(key_codes, return_index=True, return_inverse=True)
    appearance = np.argsort(first_at, kind="stable")
    rank = np.empty(len(unique), dtype=np.intp)
    rank[appearance] = np.arange(len(unique))
    codes = rank[inverse.reshape(-1)]
    order = np.argsort(codes, kind="stable")
    starts = [0, *np.cumsum(np.bincount(codes, minlength=len(unique))).tolist()]
    keys = [MemoryKey(firsts[c // len(_GROUPS)], _GROUPS[c % len(_GROUPS)]) for c in unique[appearance].tolist()]
    return Groups(keys, order, starts)


def normalised(stored: NDArray[np.float32], config: RunConfig) -> NDArray[np.float32]:
    """The index rows of stored vectors: their features, L2-normalised, float32."""
    return unit_rows(features(stored, config.layer_diff)).astype(np.float32)


def sync(
    store: MemoryStore, indexes: VectorIndexes, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]
) -> None:
    """Bring the cache of these keys up to the store."""
    if config.dim is None:
        return
    since = {key: run.keys.get(key) or KeyHead() for key in keys}
    if not since:
        return
    index = run.index_for(config, indexes)
    changes = store.load_changes(run.name, since, config.stored_dim)
    # A cache that is ahead of the store or has a gap (a stale snapshot, memory evicted past it) is rebuilt
    # from the store.
    stale = {k: KeyHead() for k, d in changes.items() if k in run.keys and not _continues(run.keys[k], d)}
    if stale:
        changes.update(store.load_changes(run.name, stale, config.stored_dim))
    for key, delta in changes.items():
        if key in stale:
            index.remove(key)
            del run.keys[key]
        if delta.n == 0:
            continue
        cached = run.keys.get(key)
        if cached is None:
            cached = run.keys[key] = CachedKey(start=delta.start, n=delta.start)
        if len(delta.vectors):
            index.append(key, normalised(delta.vectors, config))
            cached.n = delta.n
        if delta.start > cached.start:
            index.drop_front(key, delta.start - cached.start)
            cached.start = delta.start
        if delta.fit is not None:
            cached.take_fit(delta.fit)
        run.refresh_pending(key)
    run.version += 1


def _continues(cached: CachedKey, delta: KeyDelta) -> bool:
    """Whether the store's view of a key extends the cached one (else the cache is rebuilt)."""
    return delta.n >= cached.n and delta.first == cached.n and delta.start >= cached.start
