"""The refits this process has in flight, per (run, key): at most one each, shared by everything that refits.

In one process, the engine (background scheduling and the `exact` rule) and a refit-queue consumer
(`QueueWorker` in `meds serve` on a shared store) may both want a key refitted at once. Each asks here
first: a flight already in the air for the key is waited for instead of starting a second fit, and its
result is reused when it covers the vectors the asker needs (a refit loads a key's vectors when it runs, so
it covers at least those stored when it was submitted: `covers`). Only when it does not cover them does
the asker refit after it (docs/architecture.md, "The refit pipeline").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

from ..core.types import Fit, MemoryKey


@dataclass(frozen=True)
class Flight:
    """One key's refit in the air: the job's future (its fits, for this key and others) and the sequence
    number the fit will reach at least."""

    future: Future[list[Fit]]
    covers: int

    def fit_of(self, key: MemoryKey) -> Fit | None:
        """This key's fit once the job is done; None when the job failed or fitted no such key."""
        try:
            if self.future.exception() is not None:
                return None
        except CancelledError:  # the refitter shut down
            return None
        return next((fit for fit in self.future.result() if fit.key == key), None)


class RefitFlights:
    """Per (run, key), the refit in flight. Thread-safe; a flight leaves when its job is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, MemoryKey], Flight] = {}

    def get(self, run: str, key: MemoryKey) -> Flight | None:
        with self._lock:
            return self._flights.get((run, key))

    def add(self, run: str, covers: Mapping[MemoryKey, int], future: Future[list[Fit]]) -> None:
        """Record a submitted job of `run` fitting these keys (each up to at least its `covers`)."""
        with self._lock:
            for key, n in covers.items():
                self._flights[(run, key)] = Flight(future, n)
        future.add_done_callback(lambda done: self._land(run, list(covers), done))

    def _land(self, run: str, keys: list[MemoryKey], future: Future[list[Fit]]) -> None:
        with self._lock:
            for key in keys:
                flight = self._flights.get((run, key))
                if flight is not None and flight.future is future:
                    del self._flights[(run, key)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)
