"""The RefitQueue contract (every implementation: conftest.py `queue`): jobs queued by commits are fitted,
saved and acknowledged; a dead consumer's unacknowledged jobs are taken over."""

from __future__ import annotations

import time

import numpy as np

from meds_service.core.config import RunConfig
from meds_service.core.types import (
    Group,
    KeyAppend,
    MemoryKey,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
)
from meds_service.storage.redis import RedisStore
from meds_service.workers import LocalRefitter, QueueWorker
from tests.support.queue import queue_length
from tests.support.records import result_records

CONFIG = RunConfig(dim=3)


def commit(store: RedisStore, keys: list[MemoryKey], first: int = 0) -> None:
    rng = np.random.default_rng(first)
    appends = []
    for key in keys:
        ids = [f"{key.prompt_id}-{first + i}" for i in range(4)]
        records = result_records([RolloutResult(i, RolloutStatus.SCORED, None, 0, 0.0, None) for i in ids])
        appends.append(KeyAppend(key, first, rng.standard_normal((4, 3)).astype(np.float32), 0, ids, records))
    store.commit("r", CONFIG, ScoredBatch(appends, [], keys))


def test_jobs_are_fitted_saved_and_acknowledged(queue: RedisStore) -> None:
    store = queue
    keys = [MemoryKey(f"p{i}", Group.WRONG) for i in range(5)]
    commit(store, keys)
    assert store.pending_count("r") == 5 and queue_length(store) == 5
    refitter = LocalRefitter(store.spec(), 2, processes=False)
    worker = QueueWorker(store, store, refitter, consumer="c1", block_ms=10)
    assert worker.step() == 5
    assert store.pending_count("r") == 0 and queue_length(store) == 0
    heads = store.heads("r", keys)
    assert all(h.fitted_upto == h.n == 4 for h in heads.values())
    commit(store, keys[:2], first=4)  # more vectors: queued again
    assert store.pending_count("r") == 2
    assert worker.step() == 2 and store.pending_count("r") == 0
    refitter.close()


def test_a_dead_consumers_jobs_are_taken_over(queue: RedisStore) -> None:
    store = queue
    keys = [MemoryKey(f"q{i}", Group.UNKNOWN) for i in range(3)]
    commit(store, keys)
    claimed = store.claim_refits("dead", 10, 10, min_idle_ms=60_000)  # delivered, never acknowledged
    assert len(claimed) == 3 and queue_length(store) == 3
    refitter = LocalRefitter(store.spec(), 1, processes=False)
    worker = QueueWorker(store, store, refitter, consumer="alive", block_ms=10, claim_idle_s=0.01)
    time.sleep(0.05)  # the jobs have now been idle longer than claim_idle_s
    assert worker.step() == 3
    assert queue_length(store) == 0 and store.pending_count("r") == 0
    refitter.close()


def test_jobs_of_deleted_runs_are_dropped(queue: RedisStore) -> None:
    store = queue
    commit(store, [MemoryKey("p", Group.WRONG)])
    store.delete_run("r")
    worker = QueueWorker(store, store, LocalRefitter(store.spec(), 1, processes=False), consumer="c", block_ms=10)
    assert worker.step() == 1 and queue_length(store) == 0
