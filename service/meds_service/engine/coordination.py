"""The two ways a process can hold runs: as the store's only writer, or as one of many (the Coordination port).

`LocalCoordination` (SQLite): the cache is authoritative between calls, so every key is loaded at start and
counts come from the cache. `SharedCoordination` (Redis): other API replicas and workers write the same
store, so runs are checked against the store on every call, the keys a request reads are synced first,
counts come from the store, and a batch's prompts are locked across processes while it is scored.
`coordination_for` picks one, in one place; everything else in the engine is one code path. The
`Coordination` port is declared here, next to its two implementations: it is the engine's own seam.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple, Protocol

from ..core.config import RunConfig
from ..core.errors import NotFound
from ..core.types import MemoryKey
from .cache import RunMemory, sync
from .ports import MemoryStore, SharedStore, VectorIndexes


class MemoryCounts(NamedTuple):
    """A run's size (or the sum over runs) as the engine reports it."""

    keys: int
    vectors: int
    rollouts: int
    pending: int

    @classmethod
    def total(cls, parts: Sequence[MemoryCounts]) -> MemoryCounts:
        return cls(*(sum(column) for column in zip(*parts, strict=True))) if parts else cls(0, 0, 0, 0)


class Coordination(Protocol):
    """How this process's cache of the runs relates to the store, and everything that depends on it."""

    def load(self) -> list[RunMemory]: ...
    def fill(self, run: RunMemory) -> None: ...
    def names(self) -> list[str]: ...
    def run(self, name: str, *, create: bool = False) -> RunMemory: ...
    def create(self, name: str, config: Callable[[], RunConfig]) -> RunMemory | None: ...
    def delete(self, name: str) -> None: ...
    def cached(self) -> list[RunMemory]: ...
    def alive(self, run: RunMemory) -> bool: ...
    def locked(self, run: str, prompt_ids: Sequence[str]) -> AbstractContextManager[None]: ...
    def refresh(self, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]) -> None: ...
    def has_memory(self, run: RunMemory) -> bool: ...
    def counts(self, run: RunMemory) -> MemoryCounts: ...
    def totals(self) -> MemoryCounts: ...
    def refit_scope(self, run: RunMemory, everything: bool) -> tuple[list[MemoryKey], int]: ...


def coordination_for(store: MemoryStore, indexes: VectorIndexes) -> Coordination:
    """Shared when other processes write the store too (it offers cross-process locks), else local."""
    if isinstance(store, SharedStore):
        return SharedCoordination(store, indexes)
    return LocalCoordination(store, indexes)


class _Registry:
    """The runs this process has cached, by name."""

    def __init__(self, store: MemoryStore, indexes: VectorIndexes) -> None:
        self.store = store
        self.indexes = indexes
        self._runs: dict[str, RunMemory] = {}
        self._lock = threading.Lock()

    def load(self) -> list[RunMemory]:
        """Register every run the store holds (their caches empty)."""
        with self._lock:
            for record in self.store.list_runs():
                self._runs[record.name] = RunMemory(record.name, record.config, record.created_at)
            return list(self._runs.values())

    def cached(self) -> list[RunMemory]:
        with self._lock:
            return list(self._runs.values())

    def alive(self, run: RunMemory) -> bool:
        with self._lock:
            return self._runs.get(run.name) is run

    def _missing(self, name: str) -> NotFound:
        return NotFound(f"run {name!r} does not exist")


class LocalCoordination(_Registry):
    """This process is the store's only writer: its cache is the truth between calls."""

    def fill(self, run: RunMemory) -> None:
        """At start: load every key now (what the snapshot did not hold)."""
        if run.config.dim is not None:
            sync(self.store, self.indexes, run, run.config, self.store.list_keys(run.name))
        run.rollouts = self.store.counts(run.name).rollouts

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._runs)

    def run(self, name: str, *, create: bool = False) -> RunMemory:
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                if not create:
                    raise self._missing(name)
                record = self.store.save_run(name, RunConfig())
                run = self._runs[name] = RunMemory(name, record.config, record.created_at)
            return run

    def create(self, name: str, config: Callable[[], RunConfig]) -> RunMemory | None:
        with self._lock:
            if name in self._runs:
                return None
            record = self.store.save_run(name, config())
            run = self._runs[name] = RunMemory(name, record.config, record.created_at)
            return run

    def delete(self, name: str) -> None:
        """Under the run's lock (no batch of it in flight), but not the registry's while waiting for it:
        other runs are looked up meanwhile."""
        with self._lock:
            run = self._runs.get(name)
        if run is None:
            raise self._missing(name)
        with run.lock, self._lock:
            if self._runs.get(name) is not run:
                raise self._missing(name)
            self.store.delete_run(name)
            del self._runs[name]

    def locked(self, run: str, prompt_ids: Sequence[str]) -> AbstractContextManager[None]:
        return nullcontext()  # the run's lock is enough: no other process writes

    def refresh(self, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]) -> None:
        """Nothing to do: no other process changes the store."""

    def has_memory(self, run: RunMemory) -> bool:
        return bool(run.keys)

    def counts(self, run: RunMemory) -> MemoryCounts:
        """Safe without the run's lock: `list` copies the keys' counters in one step (under the GIL)."""
        cached = list(run.keys.values())
        return MemoryCounts(len(cached), sum(c.live for c in cached), run.rollouts, len(run.pending))

    def totals(self) -> MemoryCounts:
        return MemoryCounts.total([self.counts(run) for run in self.cached()])

    def refit_scope(self, run: RunMemory, everything: bool) -> tuple[list[MemoryKey], int]:
        keys = list(run.keys) if everything else sorted(run.pending)
        return keys, sum(run.keys[k].live for k in keys)


class SharedCoordination(_Registry):
    """Other processes write the store too: the store is the record and the cache follows it."""

    store: SharedStore

    def __init__(self, store: SharedStore, indexes: VectorIndexes) -> None:
        super().__init__(store, indexes)

    def fill(self, run: RunMemory) -> None:
        """Nothing at start: each replica syncs the keys it touches, when it touches them."""

    def names(self) -> list[str]:
        return [record.name for record in self.store.list_runs()]

    def run(self, name: str, *, create: bool = False) -> RunMemory:
        """The run's memory, checked against the store: another process may have created, changed or
        deleted it."""
        with self._lock:
            run = self._runs.get(name)
            record = self.store.get_run(name)
            if record is None and create:
                record = self.store.save_run(name, RunConfig())
            if record is None:
                self._runs.pop(name, None)
                raise self._missing(name)
            if run is None or run.created_at != record.created_at:  # new, or deleted and created again
                run = self._runs[name] = RunMemory(name, record.config, record.created_at)
            run.config = record.config
            return run

    def create(self, name: str, config: Callable[[], RunConfig]) -> RunMemory | None:
        with self._lock:
            if self.store.get_run(name) is not None:
                return None
            record = self.store.save_run(name, config())
            run = self._runs[name] = RunMemory(name, record.config, record.created_at)
            return run

    def delete(self, name: str) -> None:
        with self._lock:
            self._runs.pop(name, None)
            if not self.store.delete_run(name):
                raise self._missing(name)

    def locked(self, run: str, prompt_ids: Sequence[str]) -> AbstractContextManager[None]:
        return self.store.locked(run, prompt_ids)

    def refresh(self, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]) -> None:
        sync(self.store, self.indexes, run, config, keys)

    def has_memory(self, run: RunMemory) -> bool:
        return self.store.counts(run.name).keys > 0

    def counts(self, run: RunMemory) -> MemoryCounts:
        return self._counts(run.name)

    def totals(self) -> MemoryCounts:
        return MemoryCounts.total([self._counts(name) for name in self.names()])

    def _counts(self, name: str) -> MemoryCounts:
        counts = self.store.counts(name)
        return MemoryCounts(counts.keys, counts.vectors, counts.rollouts, self.store.pending_count(name))

    def refit_scope(self, run: RunMemory, everything: bool) -> tuple[list[MemoryKey], int]:
        heads = self.store.key_heads(run.name)
        keys = list(heads) if everything else self.store.list_keys(run.name, pending_only=True)
        return keys, sum(heads[k].live for k in keys if k in heads)
