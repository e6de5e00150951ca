"""Refit jobs in worker processes: each opens its own view of the store, loads keys and fits labels."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .core.clustering import fit_labels
from .core.config import RunConfig
from .core.types import Fit, Group, MemoryKey
from .engine.ports import MemoryStore

log = logging.getLogger(__name__)

_worker_stores: dict[tuple[str, str], MemoryStore] = {}
_worker_stores_lock = threading.Lock()


def open_store(spec: tuple[str, str], *, read_only: bool = False) -> MemoryStore:
    """Open the store a spec describes (`("sqlite", data_dir)` or `("redis", url)`)."""
    backend, where = spec
    if backend == "sqlite":
        from .storage.sqlite import SQLiteStore

        return SQLiteStore(where, read_only=read_only)
    if backend == "redis":
        from .storage.redis import RedisStore

        store: MemoryStore = RedisStore(where)
        return store
    raise ValueError(f"unknown store backend {backend!r}")


def _store_for(spec: tuple[str, str]) -> MemoryStore:
    with _worker_stores_lock:
        store = _worker_stores.get(spec)
        if store is None:
            store = _worker_stores[spec] = open_store(spec, read_only=True)
        return store


def refit_job(spec: tuple[str, str], run: str, config: dict[str, Any], keys: Sequence[tuple[str, int]]) -> list[Fit]:
    """Fit the given keys of a run from the store's current vectors (runs in a worker)."""
    cfg = RunConfig.from_mapping(config)
    store = _store_for(spec)
    states = store.load_keys(run, [MemoryKey(p, Group(g)) for p, g in keys], cfg.stored_dim)
    return [Fit(key, fit_labels(state.vectors, cfg), state.start, state.n) for key, state in states.items()]


def _init_worker() -> None:
    # Results do not depend on these; they only skip checks and thread oversubscription in small fits.
    import sklearn

    sklearn.set_config(assume_finite=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class LocalRefitter:
    """Runs refit jobs on this machine: a pool of worker processes (every core by default) or threads."""

    def __init__(self, spec: tuple[str, str], workers: int | None = None, *, processes: bool = True) -> None:
        self.spec = spec
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor | ThreadPoolExecutor:
        if not self.processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="meds-refit")
        context = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker)

    def warm_up(self) -> None:
        """Start the workers and import their libraries now rather than on the first refit."""
        futures = [self._pool.submit(_init_worker) for _ in range(self.workers)]
        for future in futures:
            future.result()

    def submit(self, run: str, config: RunConfig, keys: Sequence[MemoryKey]) -> Future[list[Fit]]:
        job = [(k.prompt_id, int(k.group)) for k in keys]
        with self._lock:
            try:
                return self._pool.submit(refit_job, self.spec, run, config.as_dict(), job)
            except BrokenProcessPool:
                log.error("refit worker pool broke; starting a new one")
                self._pool = self._new_pool()
                return self._pool.submit(refit_job, self.spec, run, config.as_dict(), job)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
