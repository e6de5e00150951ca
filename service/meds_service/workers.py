"""Refit jobs in worker processes: each opens its own view of the store, loads keys and fits labels."""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .core.config import RunConfig
from .core.errors import StoreUnavailable
from .core.records import KeyHead, StoreSpec
from .core.types import Fit, MemoryKey
from .engine.ports import EngineObserver, MemoryStore, RefitQueue
from .engine.refits import RefitFlights, split_keys
from .settings import Settings
from .storage import open_store

log = logging.getLogger(__name__)

_worker_stores: dict[StoreSpec, MemoryStore] = {}
_worker_stores_lock = threading.Lock()


def _store_for(spec: StoreSpec) -> MemoryStore:
    with _worker_stores_lock:
        store = _worker_stores.get(spec)
        if store is None:
            store = _worker_stores[spec] = open_store(spec, read_only=True)
        return store


def refit_job(spec: StoreSpec, run: str, config: RunConfig, keys: Sequence[MemoryKey]) -> list[Fit]:
    """Fit the given keys of a run from the store's current vectors (runs in a worker)."""
    from .core.clustering import fit_labels  # the worker's import (preloaded by its forkserver)

    states = _store_for(spec).load_keys(run, keys, config.stored_dim)
    return [Fit(key, fit_labels(state.vectors, config), state.start, state.n) for key, state in states.items()]


def _init_worker(owner: int) -> None:
    """Set up a worker process: its libraries, and a thread that ends it when `owner` (the process that
    made the pool) dies, however it dies: a SIGKILLed service must leave no worker running. (The
    forkserver and the resource tracker then exit by themselves: they live while a worker holds their
    pipes.)"""
    _warm()
    # One BLAS thread per worker: the pool already has a process per core, and refits' matrix products
    # (core/clustering.py, nearest neighbours) are small. Only worker processes: in the service's own
    # process the limit would be process-wide.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    global _watching
    if not _watching:
        _watching = True
        threading.Thread(target=_exit_with, args=(owner,), name="meds-owner-watch", daemon=True).start()


_watching = False


def _warm() -> None:
    # Results do not depend on these; they only skip checks and thread oversubscription in small fits.
    import sklearn

    from .core.clustering import skip_tree_input_checks

    sklearn.set_config(assume_finite=True)
    skip_tree_input_checks()
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _exit_with(owner: int) -> None:
    """Block until process `owner` ends, then end this process at once (no cleanup: the owner is gone)."""
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # no pidfd (an old kernel): poll instead
        while _exists(owner):
            time.sleep(1.0)
        os._exit(1)
    select.select([fd], [], [])
    os._exit(1)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalRefitter:
    """Runs refit jobs on this machine: a pool of worker processes (every core by default) or threads."""

    def __init__(self, spec: StoreSpec, workers: int | None = None, *, processes: bool = True) -> None:
        self.spec = spec
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor | ThreadPoolExecutor:
        if not self.processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="meds-refit")
        context = multiprocessing.get_context("forkserver")
        # The forkserver imports the fitting libraries once and every worker forks from it with them loaded
        # (they are most of a worker's start-up); the service's own process never needs them.
        context.set_forkserver_preload(["meds_service.workers", "meds_service.core.clustering"])
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))

    def warm_up(self) -> None:
        """Start the workers and import their libraries now rather than on the first refit."""
        futures = [self._pool.submit(_warm) for _ in range(self.workers)]
        for future in futures:
            future.result()

    def submit(self, run: str, config: RunConfig, keys: Sequence[MemoryKey]) -> Future[list[Fit]]:
        job = list(keys)
        with self._lock:
            try:
                return self._pool.submit(refit_job, self.spec, run, config, job)
            except BrokenProcessPool:
                log.error("refit worker pool broke; starting a new one")
                self._pool = self._new_pool()
                return self._pool.submit(refit_job, self.spec, run, config, job)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)


class QueueWorker:
    """Consumes refit jobs from a shared `RefitQueue`: fits them on every core, saves the labels, acknowledges.

    A job is acknowledged only after its labels are saved, so a worker killed mid-refit loses nothing:
    another consumer takes its jobs over once they have been idle for `claim_idle_s`. Jobs for keys whose
    fit is already current (another worker, or a replica under the exact rule, got there first) are
    acknowledged without work; a key the engine of the same process is refitting already (`flights`) waits
    for that refit and saves its labels rather than being fitted twice.
    """

    def __init__(
        self,
        store: MemoryStore,
        queue: RefitQueue,
        refitter: LocalRefitter,
        *,
        consumer: str,
        batch: int = 512,
        block_ms: int = 1000,
        claim_idle_s: float = 60.0,
        observer: EngineObserver | None = None,
        flights: RefitFlights | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.refitter = refitter
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.observer = observer
        self.flights = flights or RefitFlights()

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; a store outage pauses, it does not end the loop."""
        while not stop.is_set():
            try:
                self.queue.ensure_queue()
                while not stop.is_set():
                    self.step()
            except StoreUnavailable as exc:
                log.warning("refit queue unavailable (%s); retrying", exc.message)
                stop.wait(1.0)
            except Exception:
                log.exception("refit queue round failed; retrying")
                stop.wait(1.0)

    def step(self) -> int:
        """One round: claim jobs, fit what is stale, save, acknowledge. Returns the jobs handled."""
        jobs = self.queue.claim_refits(self.consumer, self.batch, self.block_ms, self.claim_idle_ms)
        by_run: dict[str, tuple[set[MemoryKey], list[bytes]]] = {}
        for job in jobs:
            keys, ids = by_run.setdefault(job.run, (set(), []))
            keys.add(job.key)
            ids.append(job.message_id)
        for run, (keys, ids) in by_run.items():
            record = self.store.get_run(run)
            if record is not None and record.config.dim is not None:
                self._refit(run, record.config, sorted(keys))
            self.queue.ack_refits(ids)
        return len(jobs)

    def _refit(self, run: str, config: RunConfig, keys: list[MemoryKey]) -> None:
        heads = self.store.heads(run, keys)
        landed = [fit for k in keys if heads[k].stale and (fit := self._fit_in_flight(run, k, heads[k]))]
        stale = [k for k in keys if heads[k].stale and k not in {fit.key for fit in landed}]
        if landed:
            self.store.save_fits(run, landed)  # saved before the job is acknowledged, whoever fitted them
        if not stale:
            return
        started = time.perf_counter()
        jobs = split_keys(stale, self.refitter.workers, {key: heads[key].live for key in stale})
        futures = [self.refitter.submit(run, config, job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            self.flights.add(run, {key: heads[key].n for key in job}, future)
        fits = [fit for future in futures for fit in future.result()]
        self.store.save_fits(run, fits)
        if self.observer is not None:
            self.observer.refit_done(len(fits), sum(len(f.labels) for f in fits), time.perf_counter() - started)

    def _fit_in_flight(self, run: str, key: MemoryKey, head: KeyHead) -> Fit | None:
        """The fit of a refit this process already has in flight for the key (the engine's), once it lands,
        when it covers the key's vectors; None when there is none, or it failed or fell short (then the key
        is refitted here)."""
        flight = self.flights.get(run, key)
        fit = flight.fit_of(key) if flight is not None else None
        return fit if fit is not None and fit.fit_start >= head.start and fit.fitted_upto >= head.n else None


def run_worker(settings: Settings) -> int:
    """`meds worker`: consume the refit queue until SIGTERM or SIGINT, then finish the round and exit."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from prometheus_client import start_http_server

    from .metrics import Metrics

    metrics = Metrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=metrics.registry)
    store = open_store(settings.store_spec(), settings.store_options())
    if not isinstance(store, RefitQueue):
        store.close()
        raise StoreUnavailable(f"the {settings.store_spec().backend} store has no shared refit queue")
    refitter = LocalRefitter(store.spec(), settings.refit_workers, processes=settings.refit_processes)
    try:
        refitter.warm_up()
        consumer = f"worker-{socket.gethostname()}-{os.getpid()}"
        log.info("meds worker %s consuming refits from %s with %d processes", consumer, store.info(), refitter.workers)
        QueueWorker(
            store,
            store,
            refitter,
            consumer=consumer,
            batch=settings.refit_queue_batch,
            claim_idle_s=settings.refit_claim_idle_s,
            observer=metrics,  # the refit metrics this worker serves
        ).run(stop)
    finally:
        refitter.close()
        store.close()
    return 0
