"""Every seam between the engine (and the refit workers) and what they run on.

Structural types: adapters implement them without importing this module. Each port has one contract suite
in tests/contract that runs every implementation.

    MemoryStore     the durable record of every run (storage/sqlite.py, storage/redis.py)
    SharedStore     a MemoryStore that other processes write too: adds per-prompt locks (Redis)
    RefitQueue      shared refit jobs, consumed by `meds worker`s (Redis)
    VectorIndexes   makes a run's kNN index (storage/index.py, FAISS)
    SnapshotStore   index snapshots on local disk, for fast restarts (storage/snapshot.py)
    Refitter        runs HDBSCAN refits somewhere (workers.py)
    EngineObserver  what the engine reports as it works (metrics.py)

The engine's own seam between one writer and many, `Coordination`, is declared where it is implemented
(engine/coordination.py): it is a port of the engine's cache, not of an adapter.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from ..core.collapse import CollapseMetrics
from ..core.config import RunConfig
from ..core.records import KeyHead, RunCounts, RunRecord, StoreSpec
from ..core.types import (
    Fit,
    Group,
    KeyDelta,
    KeyState,
    MemoryKey,
    QueuedRefit,
    RolloutResult,
    ScoredBatch,
    Snapshot,
)


class MemoryStore(Protocol):
    """The durable record of every run: configs, vectors, fits, steps and rollout results."""

    # Whether the store finds rollouts by their `rollout_hashes` (find_results' `id_hashes`, ScoredBatch's
    # `id_hashes`): the engine computes them only for a store that uses them.
    finds_ids_by_hash: bool

    def ping(self) -> None: ...
    def close(self) -> None: ...
    def checkpoint(self, idle_s: float = ..., force_bytes: int = ...) -> None: ...
    def spec(self) -> StoreSpec: ...
    def info(self) -> dict[str, str]: ...

    def list_runs(self) -> list[RunRecord]: ...
    def get_run(self, run: str) -> RunRecord | None: ...
    def save_run(self, run: str, config: RunConfig) -> RunRecord: ...
    def delete_run(self, run: str) -> bool: ...
    def counts(self, run: str) -> RunCounts: ...

    def key_heads(self, run: str) -> dict[MemoryKey, KeyHead]: ...
    def heads(self, run: str, keys: Sequence[MemoryKey]) -> dict[MemoryKey, KeyHead]: ...
    def list_keys(self, run: str, pending_only: bool = False) -> list[MemoryKey]: ...
    def pending_count(self, run: str) -> int: ...
    def load_changes(self, run: str, since: Mapping[MemoryKey, KeyHead], dim: int) -> dict[MemoryKey, KeyDelta]: ...
    def load_keys(self, run: str, keys: Sequence[MemoryKey] | None, dim: int) -> dict[MemoryKey, KeyState]: ...
    def load_steps(self, run: str, keys: Sequence[MemoryKey]) -> dict[MemoryKey, NDArray[np.int64]]: ...
    def prompt_results(self, run: str, prompt_id: str) -> dict[Group, NDArray[np.void]]: ...
    def load_texts(self, run: str, key: MemoryKey, seqs: Sequence[int]) -> list[str | None]: ...
    def find_results(
        self,
        run: str,
        prompt_ids: Sequence[str],
        rollout_ids: Sequence[str],
        id_hashes: NDArray[np.uint64] | None = None,  # their `rollout_hashes`, when the caller has them
    ) -> dict[str, RolloutResult]: ...
    def commit(self, run: str, config: RunConfig, batch: ScoredBatch) -> None: ...
    def save_fits(self, run: str, fits: Sequence[Fit]) -> int: ...


@runtime_checkable
class SharedStore(MemoryStore, Protocol):
    """A store that other processes (API replicas, workers) write too: the engine's cache must follow it,
    and a batch's prompts are locked across processes while it is scored."""

    def locked(self, run: str, prompt_ids: Sequence[str]) -> AbstractContextManager[None]: ...


@runtime_checkable
class RefitQueue(Protocol):
    """Refit jobs shared by every consumer: a job stays until a consumer acknowledges it, and one left
    unacknowledged for `min_idle_ms` (its consumer died) is handed to another."""

    def ensure_queue(self) -> None: ...
    def claim_refits(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[QueuedRefit]: ...
    def ack_refits(self, message_ids: Sequence[bytes]) -> None: ...


class VectorIndex(Protocol):
    """One run's normalised vectors, one shard per key, searched by inner product."""

    dim: int

    @property
    def device(self) -> str: ...
    @property
    def rounding_safety(self) -> float: ...
    def count(self, key: Hashable) -> int: ...
    def append(self, key: Hashable, vectors: NDArray[np.float32]) -> None: ...
    def drop_front(self, key: Hashable, n: int) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def rows(self, key: Hashable, lo: int, hi: int) -> NDArray[np.float32]: ...
    def search(
        self, key: Hashable, lo: int, hi: int, queries: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...
    def search_many(
        self, spans: Sequence[tuple[Hashable, int, int, int, int]], queries: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]: ...


class VectorIndexes(Protocol):
    """Makes the runs' indexes."""

    @property
    def device(self) -> str: ...
    def new(self, dim: int) -> VectorIndex: ...


class SnapshotStore(Protocol):
    """Index snapshots: `read` gives None for a missing or unreadable one (the store is the record)."""

    def read(self, run: str) -> Snapshot | None: ...
    def write(self, snapshot: Snapshot) -> None: ...


class Refitter(Protocol):
    """Runs HDBSCAN refits of a run's keys somewhere (worker processes), reading vectors from the store."""

    workers: int

    def submit(self, run: str, config: RunConfig, keys: Sequence[MemoryKey]) -> Future[list[Fit]]: ...
    def close(self) -> None: ...


class EngineObserver(Protocol):
    """What the engine reports as it works (implemented by the Prometheus metrics)."""

    def rollouts(self, status: str, count: int) -> None: ...
    def penalties(self, values: Sequence[float] | NDArray[np.float64]) -> None: ...
    def refit_done(self, keys: int, vectors: int, seconds: float) -> None: ...
    def refit_failed(self) -> None: ...
    def knn_fallback(self, tier: str) -> None: ...
    def collapse(self, run: str, metrics: CollapseMetrics) -> None: ...
    def run_deleted(self, run: str) -> None: ...


class NullObserver:
    """An EngineObserver that records nothing."""

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

    def collapse(self, run: str, metrics: CollapseMetrics) -> None:
        pass

    def run_deleted(self, run: str) -> None:
        pass


__all__ = [
    "EngineObserver",
    "MemoryStore",
    "NullObserver",
    "RefitQueue",
    "Refitter",
    "SharedStore",
    "SnapshotStore",
    "VectorIndex",
    "VectorIndexes",
]
