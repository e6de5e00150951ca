"""Refits coalesce: one refit per key in flight in a process, reused by whoever needs that key next."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from harness.reference import ReferenceMEDS, RefRollout
from meds_service.core.config import RunConfig
from meds_service.core.types import Fit, Group, MemoryKey
from meds_service.engine import ErrorMemory
from meds_service.engine.flights import Flight, RefitFlights
from meds_service.storage.index import ShardIndexes
from meds_service.storage.sqlite import SQLiteStore
from meds_service.workers import LocalRefitter
from tests.unit.test_engine import to_batch


class Counting:
    """A real (thread) refitter that records the keys of every job submitted to it."""

    def __init__(self, inner: LocalRefitter) -> None:
        self.inner = inner
        self.workers = inner.workers
        self.jobs: list[list[MemoryKey]] = []

    def submit(self, run: str, config: RunConfig, keys: Sequence[MemoryKey]) -> Future[list[Fit]]:
        self.jobs.append(list(keys))
        return self.inner.submit(run, config, keys)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[ErrorMemory, Counting, LocalRefitter]]:
    """An engine with background refits off (only the exact rule refits), its counting refitter, and a
    second refitter standing for another consumer of the same process (a refit-queue worker)."""
    store = SQLiteStore(tmp_path / "data")
    counting = Counting(LocalRefitter(store.spec(), 2, processes=False))
    other = LocalRefitter(store.spec(), 1, processes=False)
    engine = ErrorMemory(store, counting, indexes=ShardIndexes())
    engine.load()
    yield engine, counting, other
    counting.close()
    other.close()
    store.close()


def rollouts(step: int, prompts: int, per_prompt: int = 4) -> list[RefRollout]:
    rng = np.random.default_rng(step)
    fingerprints = rng.integers(-2, 3, size=(prompts * per_prompt, 3)).astype(float)
    fingerprints[~fingerprints.any(axis=1), 0] = 1.0  # no zero vectors: cosine needs a direction
    return [
        RefRollout(f"s{step}-p{p}-r{r}", f"p{p}", False, fingerprints[p * per_prompt + r].tolist())
        for p in range(prompts)
        for r in range(per_prompt)
    ]


def check(engine: ErrorMemory, reference: ReferenceMEDS, step: list[RefRollout]) -> None:
    want = reference.step(step)
    for result in engine.score("r", to_batch(step, 3)):
        assert (result.cluster_size, result.penalty) == (want[result.rollout_id].cluster_size,
                                                         want[result.rollout_id].penalty)  # fmt: skip


def test_the_exact_rule_refits_stale_keys_in_parallel_jobs(parts: tuple[ErrorMemory, Counting, LocalRefitter]) -> None:
    engine, counting, _ = parts
    reference = ReferenceMEDS()
    check(engine, reference, rollouts(0, 4))
    assert engine.stats("r")["pending_refits"] == 4 and counting.jobs == []
    check(engine, reference, rollouts(1, 4))  # reads the 4 stale keys: refitted first, over both workers
    assert sorted(len(job) for job in counting.jobs) == [2, 2]
    assert sorted(k.prompt_id for job in counting.jobs for k in job) == ["p0", "p1", "p2", "p3"]


def test_a_refit_in_flight_elsewhere_in_the_process_is_reused_not_repeated(
    parts: tuple[ErrorMemory, Counting, LocalRefitter],
) -> None:
    engine, counting, other = parts
    reference = ReferenceMEDS()
    check(engine, reference, rollouts(0, 2))
    run = engine.coordination.run("r")
    keys = [MemoryKey("p0", Group.WRONG), MemoryKey("p1", Group.WRONG)]
    # Another consumer of this process is refitting p0 (covering its 4 vectors); its fit lands 0.2 s after the
    # engine first finds it in the air (a fixed delay from here lost the race on a busy machine: the flight
    # had landed, unsaved, before the engine looked, and the engine refitted p0 itself).
    fits = other.submit("r", run.config, keys[:1]).result()
    future: Future[list[Fit]] = Future()
    flights = engine.refits.flights
    flights.add("r", {keys[0]: run.keys[keys[0]].n}, future)
    timer = threading.Timer(0.2, future.set_result, args=(fits,))
    real_get = flights.get

    def get(name: str, key: MemoryKey) -> Flight | None:
        flight = real_get(name, key)
        if key == keys[0] and flight is not None and not timer.is_alive() and not future.done():
            timer.start()
        return flight

    flights.get = get  # type: ignore[method-assign]
    check(engine, reference, rollouts(1, 2))  # exact: p0 waits for that fit, only p1 is refitted here
    assert timer.is_alive() or future.done()  # the engine did find the flight
    timer.join()
    assert counting.jobs == [[keys[1]]]
    assert run.keys[keys[0]].fitted_upto == 4 and run.keys[keys[1]].fitted_upto == 4


def test_a_flight_that_falls_short_is_waited_for_then_refitted(
    parts: tuple[ErrorMemory, Counting, LocalRefitter],
) -> None:
    engine, counting, _ = parts
    reference = ReferenceMEDS()
    check(engine, reference, rollouts(0, 1))
    run = engine.coordination.run("r")
    key = MemoryKey("p0", Group.WRONG)
    short: Future[list[Fit]] = Future()  # another consumer's refit that will cover 2 of the key's 4 vectors
    engine.refits.flights.add("r", {key: 2}, short)
    timer = threading.Timer(0.2, short.set_result, args=([Fit(key, np.array([-1, -1]), 0, 2)],))
    timer.start()
    check(engine, reference, rollouts(1, 1))  # waits for it, takes it, finds it short, refits once more
    timer.join()
    assert counting.jobs == [[key]] and run.keys[key].fitted_upto == 4
    assert len(engine.refits.flights) == 0


def test_flights_hold_one_refit_per_key_and_leave_when_done() -> None:
    flights = RefitFlights()
    key, other = MemoryKey("p", Group.WRONG), MemoryKey("q", Group.WRONG)
    first: Future[list[Fit]] = Future()
    flights.add("r", {key: 3, other: 5}, first)
    flight = flights.get("r", key)
    assert flight is not None and flight.covers == 3 and flights.get("r2", key) is None
    second: Future[list[Fit]] = Future()
    flights.add("r", {key: 7}, second)  # the newer refit of `key` replaces the record; `other` keeps the first
    first.set_result([Fit(key, np.zeros(3, np.int64), 0, 3), Fit(other, np.zeros(5, np.int64), 0, 5)])
    assert flights.get("r", other) is None and flights.get("r", key) is not None  # the second one still flies
    second.set_exception(RuntimeError("worker died"))
    assert len(flights) == 0
    assert flight.fit_of(key) is not None and flight.fit_of(MemoryKey("x", Group.WRONG)) is None
    assert RefitFlights.__name__ and flights.get("r", key) is None
