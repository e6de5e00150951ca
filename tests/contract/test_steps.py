"""`step` is stored with every remembered rollout, on every store, and a prompt's view shows its clusters
over steps; stores written before steps were kept still open and read as "no step recorded"."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import numpy as np
import redis

from meds_service.core.config import RunConfig
from meds_service.core.types import NO_STEP, Group, KeyAppend, MemoryKey, RolloutResult, RolloutStatus, ScoredBatch
from meds_service.engine import ErrorMemory
from meds_service.storage.redis import RedisStore
from meds_service.storage.sqlite import DB_FILE, SQLiteStore
from tests.support.records import result_records
from tests.unit.test_engine import grid_trace, to_batch

W = MemoryKey("p", Group.WRONG)
CONFIG = RunConfig(dim=3)


def test_a_prompt_shows_its_clusters_over_steps(engine: ErrorMemory) -> None:
    for step, rollouts in enumerate(grid_trace(5, 6, prompts=2, per_prompt=8)):
        engine.score("s", dataclasses.replace(to_batch(rollouts, 3), step=100 + step))
    engine.recluster("s", everything=True)
    group = engine.prompt("s", "p0")["groups"]["wrong"]
    steps, labels = group["steps"], group["labels"]
    assert len(steps) == len(labels) == group["fitted"] and set(steps) <= set(range(100, 106))
    for label, cluster in group["cluster_steps"].items():
        mine = [s for s, lab in zip(steps, labels, strict=True) if str(lab) == label]
        assert cluster == {"size": len(mine), "first_step": min(mine), "last_step": max(mine)}
        assert group["clusters"][label] == cluster["size"]


def test_rollouts_sent_without_a_step_have_none(engine: ErrorMemory) -> None:
    for rollouts in grid_trace(6, 2, prompts=1, per_prompt=4):
        engine.score("n", to_batch(rollouts, 3))
    engine.recluster("n", everything=True)
    group = next(iter(engine.prompt("n", "p0")["groups"].values()))
    assert set(group["steps"]) == {None}
    assert all(c["first_step"] is None and c["last_step"] is None for c in group["cluster_steps"].values())


def append(first: int, count: int, step: int | None) -> KeyAppend:
    ids = [f"r{first + i}" for i in range(count)]
    results = result_records([RolloutResult(i, RolloutStatus.SCORED, None, 0, 0.0, None) for i in ids])
    vectors = np.ones((count, 3), dtype=np.float32)
    return KeyAppend(W, first, vectors, 0, ids, results, step)


def test_an_sqlite_store_without_steps_opens_and_records_them_from_then_on(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    store.commit("r", CONFIG, ScoredBatch([append(0, 2, None)]))
    store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:  # the layout before steps were kept
        db.execute("ALTER TABLE chunks DROP COLUMN step")
    store = SQLiteStore(tmp_path)
    assert store.load_steps("r", [W])[W].tolist() == [NO_STEP, NO_STEP]
    store.commit("r", CONFIG, ScoredBatch([append(2, 1, 4)]))
    assert store.load_steps("r", [W])[W].tolist() == [NO_STEP, NO_STEP, 4]
    assert store.counts("r").rollouts == 3
    store.close()


def test_a_redis_store_without_steps_opens_and_records_them_from_then_on(redis_url: str) -> None:
    store = RedisStore(redis_url)
    store.commit("r", CONFIG, ScoredBatch([append(0, 2, None)]))
    raw = redis.Redis.from_url(redis_url)
    meta = next(k for k in raw.scan_iter("meds:{p:r:*}:m0"))
    raw.hdel(meta, "sbase")  # the layout before steps were kept: no sbase, no steps string
    raw.delete(meta.replace(b":m0", b":s0"))
    assert store.load_steps("r", [W])[W].tolist() == [NO_STEP, NO_STEP]
    store.commit("r", CONFIG, ScoredBatch([append(2, 2, 8)]))
    assert store.load_steps("r", [W])[W].tolist() == [NO_STEP, NO_STEP, 8, 8]
    raw.close()
    store.close()
