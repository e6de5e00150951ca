"""Refit bookkeeping: which keys need an HDBSCAN refit, submitting them to the Refitter, adopting results.

A finished fit is saved to the store first, then adopted by the cache; a fit older than the one held is
never adopted (`KeyHead.admits`). Under `consistency="exact"` a score that reads a key with a pending
refit waits for it first (`wait_for`). A key has at most one refit in flight in this process
(engine/flights.py): a waiter reuses the one in the air, and refits again only if it fell short.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..core.config import RunConfig
from ..core.errors import StoreUnavailable
from ..core.types import Fit, MemoryKey
from .cache import RefitJob, RunMemory
from .coordination import Coordination
from .flights import RefitFlights
from .ports import EngineObserver, MemoryStore, Refitter
from .views import ReclusterReport

log = logging.getLogger(__name__)

MAX_EXACT_ROUNDS = 3


class Refits:
    """The refit jobs of every run this process holds."""

    def __init__(
        self,
        store: MemoryStore,
        refitter: Refitter,
        coordination: Coordination,
        observer: EngineObserver,
        notify: Callable[[], None],
        flights: RefitFlights | None = None,
    ) -> None:
        self.store = store
        self.refitter = refitter
        self.coordination = coordination
        self.observer = observer
        self.notify = notify  # called when keys became pending or a job finished
        self.flights = flights or RefitFlights()

    def wait_for(self, run: RunMemory, config: RunConfig, keys: Iterable[MemoryKey]) -> None:
        """The `exact` rule: keys this batch reads must have a fit of all their vectors first.

        A key with a refit in flight waits for that one (and takes its fit if it covers the key's vectors);
        only the others are submitted, split over the refitter's workers so that they fit in parallel."""
        due = [k for k in keys if k in run.pending]
        rounds = 0
        while due:
            rounds += 1
            if rounds > MAX_EXACT_ROUNDS:
                raise StoreUnavailable("refits of this batch's keys keep going stale; retry", retry_after=1)
            waits = {id(job): job for k in due if (job := run.inflight.get(k)) is not None}
            fresh = self._after_other_flights(run, [k for k in due if k not in run.inflight])
            for part in split_keys(fresh, self.refitter.workers, {k: run.keys[k].live for k in fresh if k in run.keys}):
                job = self.submit(run, config, part)
                waits[id(job)] = job
            for job in waits.values():
                self.apply(run, job)
            due = [k for k in due if k in run.pending]

    def _after_other_flights(self, run: RunMemory, keys: list[MemoryKey]) -> list[MemoryKey]:
        """Wait for the refits another part of this process (a refit-queue consumer) has in flight for these
        keys and adopt their fits; return the keys still to refit. Caller holds the run lock."""
        todo, fits = [], []
        for key in keys:
            flight = self.flights.get(run.name, key)
            fit = flight.fit_of(key) if flight is not None else None  # waits for the flight to land
            if fit is None:
                todo.append(key)
            else:
                fits.append(fit)
        if fits:
            self._adopt(run, fits)
        return [k for k in todo if k in run.pending] + [f.key for f in fits if f.key in run.pending]

    def submit(self, run: RunMemory, config: RunConfig, keys: Sequence[MemoryKey]) -> RefitJob:
        job = RefitJob(self.refitter.submit(run.name, config, keys))
        job.future.add_done_callback(lambda _: self.notify())
        for key in keys:
            run.inflight[key] = job
        self.flights.add(run.name, {key: run.keys[key].n for key in keys if key in run.keys}, job.future)
        return job

    def apply(self, run: RunMemory, job: RefitJob) -> None:
        """Wait for a refit job and adopt its labels (store first, then cache). Caller holds the run lock."""
        try:
            fits = job.future.result()
        except Exception:
            log.exception("refit of run %s failed", run.name)
            self.observer.refit_failed()
            fits = []
        for key in [k for k, j in run.inflight.items() if j is job]:
            del run.inflight[key]
        if fits and self._adopt(run, fits):
            self.observer.refit_done(len(fits), sum(len(f.labels) for f in fits), job.seconds)

    def _adopt(self, run: RunMemory, fits: list[Fit]) -> bool:
        """Save finished fits, then take them into the cache (store first). Caller holds the run lock."""
        if not self.coordination.alive(run):
            return False
        self.store.save_fits(run.name, fits)
        held = [fit for fit in fits if fit.key in run.keys]
        for fit in held:
            run.keys[fit.key].take_fit(fit)
        run.refresh_pending_keys(fit.key for fit in held)
        return True

    def schedule(self, max_jobs: int, max_keys_per_job: int, max_vectors_per_job: int) -> int:
        """Background scheduling: submit pending keys not yet in flight, batched. Returns jobs submitted."""
        submitted = 0
        for run in self.coordination.cached():
            with run.lock:
                todo = [k for k in run.pending if k not in run.inflight and self.flights.get(run.name, k) is None]
                for job in _batches(todo, run, max_keys_per_job, max_vectors_per_job, max_jobs - submitted):
                    if submitted >= max_jobs:
                        return submitted
                    self.submit(run, run.config, job)
                    submitted += 1
        return submitted

    def reap(self, block: bool = False) -> int:
        """Adopt the results of finished background refit jobs. Returns jobs applied."""
        applied = 0
        for run in self.coordination.cached():
            with run.lock:
                for job in [j for j in run.jobs() if block or j.future.done()]:
                    self.apply(run, job)
                    applied += 1
        return applied

    def in_flight(self) -> int:
        return sum(len(run.jobs()) for run in self.coordination.cached())

    def recluster(self, run: RunMemory, everything: bool) -> ReclusterReport:
        """Refit now: the pending keys (or every key) of a run, in parallel, and answer when done."""
        started = time.perf_counter()
        with run.lock:
            keys, vectors = self.coordination.refit_scope(run, everything)
            for key in keys:
                if key in run.inflight:
                    self.apply(run, run.inflight[key])
            sizes = {key: run.keys[key].live for key in keys if key in run.keys}
            jobs = [self.submit(run, run.config, part) for part in split_keys(keys, self.refitter.workers, sizes)]
            for job in jobs:
                self.apply(run, job)
        return {
            "run": run.name,
            "refitted_keys": len(keys),
            "vectors": vectors,
            "seconds": round(time.perf_counter() - started, 6),
        }


def split_keys(
    keys: list[MemoryKey], parts: int, sizes: Mapping[MemoryKey, int] | None = None, max_keys: int | None = None
) -> list[list[MemoryKey]]:
    """Keys dealt into at most `parts` jobs (none when there are no keys). With their `sizes` (vectors), the
    largest key goes first, each to the job with the fewest vectors so far that holds under `max_keys` keys,
    so that the jobs end together; without, round-robin."""
    parts = max(1, min(parts, len(keys)))
    if not keys:
        return []
    if sizes is None:
        return [keys[i::parts] for i in range(parts)]
    jobs: list[list[MemoryKey]] = [[] for _ in range(parts)]
    lightest = [(0, i) for i in range(parts)]  # a heap of (vectors, job)
    for key in sorted(keys, key=lambda k: -sizes.get(k, 0)):  # stable: equal sizes keep their order
        full = []
        vectors, i = heapq.heappop(lightest)
        while max_keys is not None and len(jobs[i]) >= max_keys and lightest:
            full.append((vectors, i))
            vectors, i = heapq.heappop(lightest)
        jobs[i].append(key)
        heapq.heappush(lightest, (vectors + sizes.get(key, 0), i))
        for job in full:
            heapq.heappush(lightest, job)
    return [job for job in jobs if job]


def _batches(
    keys: list[MemoryKey], run: RunMemory, max_keys: int, max_vectors: int, slots: int
) -> Iterable[list[MemoryKey]]:
    """Background jobs for pending keys. When they all fit in the `slots` jobs that may start now, they are
    shared out evenly (every worker gets a part); otherwise jobs are filled in order up to the caps."""
    sizes = {key: run.keys[key].live for key in keys}
    if len(keys) <= slots * max_keys and sum(sizes.values()) <= slots * max_vectors:
        yield from split_keys(keys, slots, sizes, max_keys)
        return
    job: list[MemoryKey] = []
    vectors = 0
    for key in keys:
        size = sizes[key]
        if job and (len(job) >= max_keys or vectors + size > max_vectors):
            yield job
            job, vectors = [], 0
        job.append(key)
        vectors += size
    if job:
        yield job


__all__ = ["MAX_EXACT_ROUNDS", "RefitFlights", "Refits", "split_keys"]
