"""Admission of score requests: a bound on the work in flight, per run and in all (docs/architecture.md,
"Admission").

A score request holds a slot from before its body is read until its answer is built. Past either bound it is
refused at once with 503 and `Retry-After` instead of queueing: a run's batches are scored one at a time
(the engine holds the run's lock for a whole batch), so a queue only makes every answer later, and a refused
client's retry is cheaper than a request that waits behind others until its trainer gives up. Slots count
requests, not rollouts, because admission happens before the body is read; a request's size is bounded by
`MEDS_MAX_BODY_BYTES` and `MEDS_MAX_BATCH`.

The waits refusals advise are spread out, one slot apart: when a slot frees about every `s` seconds (recent
requests held a slot `hold` seconds with `bound` slots busy: s = hold / bound), the first refused request is
told to come back in about s, the next one in about 2s, and so on (each +-50 % of s at random), so that
refused clients return about one per slot that frees, not together nor in a crowd that is refused again.
And a slot that frees within one slot time of an advised return is kept for it: a request that arrives while
no advised return is due is refused then, so a client that has just been answered and sends its next batch
at once does not take the slot back from a client that was told to wait. A request that arrives once an
advised return is due is taken for it. Nothing else is held: an advised return missed by more than one slot
time is forgotten.
"""

from __future__ import annotations

import bisect
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

Bound = Literal["run", "total"]

DEFAULT_HOLD_S = 1.0  # what a slot is assumed to take before any request has finished
MIN_RETRY_AFTER_S = 0.05
JITTER = 0.5  # the advised wait is spread over [1 - JITTER, 1 + JITTER] times the estimate
SMOOTHING = 0.2  # weight of the newest request in the running mean of hold times


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted, and when to come back."""

    bound: Bound
    limit: int
    retry_after_s: float

    def message(self, run: str) -> str:
        where = f"run {run!r} has" if self.bound == "run" else "the service has"
        setting = "MEDS_MAX_INFLIGHT_PER_RUN" if self.bound == "run" else "MEDS_MAX_INFLIGHT_TOTAL"
        return f"{where} {self.limit} score requests in flight ({setting}); retry after {self.retry_after_s:.2f} s"

    def headers(self) -> dict[str, str]:
        """`Retry-After` in whole seconds (the standard form) and `retry-after-ms`, which clients that read
        it (meds_client does) prefer."""
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after_s))),
            "retry-after-ms": str(max(1, round(self.retry_after_s * 1000))),
        }


class Admission:
    """Counts score requests in flight per run and in all; refuses past `per_run` or `total`. Thread-safe,
    and cheap enough for the event loop (a lock held for a few dictionary operations)."""

    def __init__(
        self,
        per_run: int,
        total: int,
        *,
        max_retry_after_s: float = 5.0,
        on_refusal: Callable[[Bound], None] | None = None,
        on_change: Callable[[int], None] | None = None,
        uniform: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_run < 1 or total < 1:
            raise ValueError("admission bounds must be at least 1")
        self.per_run = per_run
        self.total = total
        self.max_retry_after_s = max_retry_after_s
        self.on_refusal = on_refusal or (lambda _: None)
        self.on_change = on_change or (lambda _: None)
        self.uniform = uniform
        self.clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, int] = {}
        self._in_flight = 0
        self._hold_s: dict[str, float] = {}  # running mean of how long a request of the run held its slot
        self._hold_all_s = DEFAULT_HOLD_S
        self._returns: dict[str, list[float]] = {}  # per run (and "" for the total): advised return times, sorted

    def in_flight(self, run: str | None = None) -> int:
        with self._lock:
            return self._in_flight if run is None else self._runs.get(run, 0)

    def enter(self, run: str) -> Refusal | None:
        """Take a slot of `run`, or say why not (and take nothing)."""
        with self._lock:
            now = self.clock()
            held = self._runs.get(run, 0)
            every_s = self._hold_s.get(run, self._hold_all_s) / self.per_run
            returns = self._returns_of(run, now, every_s)
            due = bisect.bisect_right(returns, now)
            kept = bisect.bisect_right(returns, now + every_s) - due  # slots kept for returns due within a slot
            if held >= self.per_run or (not due and held + kept >= self.per_run):
                refusal = self._refusal("run", self.per_run, every_s, run, now)
            elif self._in_flight >= self.total:
                refusal = self._refusal("total", self.total, self._hold_all_s / self.total, "", now)
            else:
                if due:
                    del returns[0]  # this arrival is taken for the earliest return due
                self._runs[run] = held + 1
                self._in_flight += 1
                refusal = None
            in_flight = self._in_flight
        if refusal is not None:
            self.on_refusal(refusal.bound)
        else:
            self.on_change(in_flight)
        return refusal

    def leave(self, run: str, held_s: float) -> None:
        """Give back a slot taken by `enter`, held for `held_s` seconds."""
        with self._lock:
            left = self._runs[run] - 1
            if left:
                self._runs[run] = left
            else:
                del self._runs[run]
            self._in_flight -= 1
            self._hold_s[run] = _smoothed(self._hold_s.get(run), held_s)
            self._hold_all_s = _smoothed(self._hold_all_s, held_s)
            if len(self._hold_s) > 4 * self.total:  # forget runs that come and go; keep those in flight
                self._hold_s = {name: s for name, s in self._hold_s.items() if name in self._runs or name == run}
                self._returns = {name: t for name, t in self._returns.items() if t and (name in self._runs or not name)}
            in_flight = self._in_flight
        self.on_change(in_flight)

    def _returns_of(self, line: str, now: float, every_s: float) -> list[float]:
        """The advised returns of a run ("" for the total), without those missed by more than a slot time."""
        returns = self._returns.setdefault(line, [])
        del returns[: bisect.bisect_left(returns, now - every_s)]
        return returns

    def _refusal(self, bound: Bound, limit: int, every_s: float, line: str, now: float) -> Refusal:
        """Advise a return one slot (`every_s`) after the latest return advised on the same line (caller holds
        the lock)."""
        returns = self._returns_of(line, now, every_s)
        after = max(returns[-1] if returns else now, now) + every_s * (1.0 - JITTER + 2.0 * JITTER * self.uniform())
        wait = min(max(after - now, MIN_RETRY_AFTER_S), self.max_retry_after_s)
        bisect.insort(returns, now + wait)
        return Refusal(bound, limit, wait)


def _smoothed(mean: float | None, value: float) -> float:
    return value if mean is None else (1.0 - SMOOTHING) * mean + SMOOTHING * value


def admission_of(request: Request) -> Admission:
    return request.app.state.admission  # type: ignore[no-any-return]


async def score_slot(request: Request, admission: Annotated[Admission, Depends(admission_of)]) -> AsyncIterator[None]:
    """A slot for one score request, taken before its body is read and given back once its answer is built;
    503 with `Retry-After` at once when there is none. The run is read from the path as sent (the route
    validates it and declares it in the schema)."""
    run = str(request.path_params.get("run", ""))
    refusal = admission.enter(run)
    if refusal is not None:
        raise HTTPException(503, refusal.message(run), headers=refusal.headers())
    started = time.perf_counter()
    try:
        yield
    finally:
        admission.leave(run, time.perf_counter() - started)


ScoreSlot = Depends(score_slot, scope="function")
"""The score route's admission: `dependencies=[ScoreSlot]`; it runs after authentication."""

__all__ = ["Admission", "Refusal", "ScoreSlot", "admission_of", "score_slot"]
