"""On a shared store, the refit-queue consumer of `meds serve` and the engine of the same process never fit
one key twice at once: the consumer waits for the engine's refit in flight and saves its labels."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from meds_service.core.types import Fit, Group, MemoryKey
from meds_service.engine.flights import RefitFlights
from meds_service.storage.redis import RedisStore
from meds_service.workers import LocalRefitter, QueueWorker
from tests.contract.test_queue_worker import CONFIG, commit
from tests.support.queue import queue_length
from tests.unit.test_coalescing import Counting


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    redis_store = RedisStore(redis_url)
    redis_store.ensure_queue()
    yield redis_store
    redis_store.close()


def test_the_queue_consumer_reuses_the_engines_refit_in_flight(store: RedisStore) -> None:
    keys = [MemoryKey(f"p{i}", Group.WRONG) for i in range(3)]
    commit(store, keys)  # 4 vectors per key, 3 refit jobs queued
    flights = RefitFlights()
    engine_refitter = LocalRefitter(store.spec(), 1, processes=False)
    counting = Counting(LocalRefitter(store.spec(), 2, processes=False))
    try:
        # The engine (the exact rule, say) is refitting p0 over its 4 vectors; its fit lands in 0.2 s.
        fits = engine_refitter.submit("r", CONFIG, keys[:1]).result()
        in_flight: Future[list[Fit]] = Future()
        flights.add("r", {keys[0]: 4}, in_flight)
        timer = threading.Timer(0.2, in_flight.set_result, args=(fits,))
        timer.start()
        worker = QueueWorker(store, store, counting, consumer="c1", block_ms=10, flights=flights)
        assert worker.step() == 3
        timer.join()
        assert sorted(k.prompt_id for job in counting.jobs for k in job) == ["p1", "p2"]  # p0 not fitted twice
        assert store.pending_count("r") == 0 and queue_length(store) == 0  # p0's labels saved before the ack
        assert all(h.fitted_upto == h.n == 4 for h in store.heads("r", keys).values())
        # A flight that fails (or falls short of the 8 vectors) is waited for, then the key is fitted here.
        commit(store, keys[:1], first=4)
        short: Future[list[Fit]] = Future()
        flights.add("r", {keys[0]: 2}, short)
        threading.Timer(0.2, short.set_exception, args=(RuntimeError("worker died"),)).start()
        assert worker.step() == 1
        assert counting.jobs[-1] == [keys[0]] and store.heads("r", keys[:1])[keys[0]].fitted_upto == 8
        assert len(flights) == 0
    finally:
        engine_refitter.close()
        counting.close()
