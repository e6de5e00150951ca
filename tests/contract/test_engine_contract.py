"""The engine gives the reference's results on every store (SQLite exclusive, Redis shared)."""

from __future__ import annotations

from typing import Any

import pytest

from harness.reference import ReferenceMEDS
from meds_service.engine import ErrorMemory
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
