"""Background refit scheduling: one thread that hands pending keys to the refitter and adopts results."""

from __future__ import annotations

import logging
import threading

from .memory import ErrorMemory

log = logging.getLogger(__name__)


class RefitScheduler:
    """Wakes after ingest (or every `interval_s`), applies finished refits and submits pending keys.

    At most `max_jobs` jobs are in flight, so that a score request that must wait for a refit (the `exact`
    rule) queues behind little background work.
    """

    def __init__(
        self,
        engine: ErrorMemory,
        *,
        interval_s: float = 0.5,
        max_jobs: int = 2,
        max_keys_per_job: int = 256,
        max_vectors_per_job: int = 50_000,
    ) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.max_jobs = max_jobs
        self.max_keys_per_job = max_keys_per_job
        self.max_vectors_per_job = max_vectors_per_job
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="meds-refit-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def tick(self) -> int:
        """One round: adopt finished jobs, then fill the free job slots. Returns jobs submitted."""
        self.engine.reap_refits()
        free = self.max_jobs - self.engine.inflight_jobs()
        if free <= 0:
            return 0
        return self.engine.schedule_refits(free, self.max_keys_per_job, self.max_vectors_per_job)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.tick()
            except Exception:  # keep scheduling: a failed round leaves its keys pending for the next one
                log.exception("refit scheduling round failed")
