"""The engine gives the reference's results on every store (SQLite exclusive, Redis shared)."""

from __future__ import annotations

from typing import Any

import pytest

from harness.reference import ReferenceMEDS
from meds_service.engine import ErrorMemory, memory
from tests.unit.test_engine import grid_trace, replay, to_batch


def test_tie_heavy_trace(engine: ErrorMemory) -> None:
    assert replay(engine, "ties", ReferenceMEDS(), grid_trace(11, 10), 3) > 300


@pytest.mark.parametrize("config", [{"penalty_target": "both", "knn_k": 5}, {"max_memory_per_key": 4}])
def test_configs(engine: ErrorMemory, config: dict[str, Any]) -> None:
    engine.put_config("cfg", dict(config))
    assert replay(engine, "cfg", ReferenceMEDS(**config), grid_trace(12, 8, dim=4), 4) > 150


def test_stats_views_and_delete(engine: ErrorMemory) -> None:
    steps = list(grid_trace(13, 3))
    for step in steps:
        engine.score("v", to_batch(step, 3))
    stats = engine.stats("v")
    stored = sum(1 for step in steps for r in step if r.fingerprint is not None)
    assert stats["vectors"] == stats["rollouts"] == stored and stats["keys"] > 0
    engine.recluster("v", everything=True)
    assert engine.stats("v")["pending_refits"] == 0
    group = engine.prompt("v", "p0")["groups"]["wrong"]
    assert group["fitted"] == group["vectors"] == len(group["labels"])
    again = engine.score("v", to_batch(steps[-1], 3))
    assert {r.status.value for r in again} <= {"duplicate", "skipped"}
    assert "v" in engine.run_names()
    engine.delete("v")
    assert "v" not in engine.run_names()


def test_ids_are_hashed_only_for_a_store_that_finds_them_by_hash(
    engine: ErrorMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing a request's ids costs about 1.5 ms per 8,192 rollouts; Redis looks ids up by name, so the
    engine skips it there, and a retried batch is still answered as duplicates on every store."""
    calls = []
    real = memory.rollout_hashes

    def counted(prompt_ids: Any, rollout_ids: Any) -> Any:
        calls.append(len(rollout_ids))
        return real(prompt_ids, rollout_ids)

    monkeypatch.setattr(memory, "rollout_hashes", counted)
    step = next(iter(grid_trace(14, 1)))
    engine.score("h", to_batch(step, 3))
    again = engine.score("h", to_batch(step, 3))
    assert {r.status.value for r in again} <= {"duplicate", "skipped"}
    assert calls == ([len(step)] * 2 if engine.store.finds_ids_by_hash else [])
