"""A multi-epoch trace replayed through the HTTP API equals a plain implementation of docs/architecture.md,
"The algorithm"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from harness.reference import ReferenceMEDS
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = pytest.mark.slow


def replay(
    base_url: str,
    run: str,
    spec: TraceSpec,
    reference: ReferenceMEDS,
    between: Callable[[], Any] | None = None,
) -> dict[str, int]:
    """Send every step, compare every result with the reference; returns counts of what was compared."""
    seen = {"rollouts": 0, "penalised": 0, "noise": 0, "clusters": 0, "skipped": 0}
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for step in trace_steps(spec):
            response = client.post(f"/v1/runs/{run}/score", json=to_wire(step))
            assert response.status_code == 200, response.text
            expected = reference.step(step)
            got = response.json()["results"]
            assert [g["rollout_id"] for g in got] == [r.rollout_id for r in step]
            for item in got:
                want = expected[item["rollout_id"]]
                where = item["rollout_id"]
                assert item["cluster_size"] == want.cluster_size, where
                assert item["penalty"] == want.penalty, where
                assert item["shaped_reward"] == want.shaped_reward, where
                seen["rollouts"] += 1
                seen["penalised"] += item["penalty"] > 0
                seen["noise"] += item["cluster"] == -1
                seen["clusters"] += (item["cluster"] or -1) >= 0
                seen["skipped"] += item["status"] == "skipped"
            if between is not None:
                between()
    return seen


def test_trace_matches_reference_exactly(meds_server: str) -> None:
    spec = TraceSpec()
    seen = replay(meds_server, "trace", spec, ReferenceMEDS())
    assert seen["rollouts"] == spec.prompts * spec.rollouts * spec.epochs
    # The trace must exercise every path: penalties, noise votes, real clusters, skipped rollouts.
    assert seen["penalised"] > 500 and seen["noise"] > 50 and seen["clusters"] > 200 and seen["skipped"] > 100


@pytest.mark.parametrize(
    "config",
    [
        {"penalty_target": "both", "knn_k": 5},
        {"penalty_target": "correct", "noise_policy": "ignore", "alpha": 0.3, "beta": 0.5},
        {"layer_diff": True, "last_n_layers": 8},
        {"penalty_target": "none", "last_n_layers": 6},
    ],
)
def test_trace_matches_reference_for_other_configs(meds_server: str, config: dict[str, Any]) -> None:
    httpx.put(f"{meds_server}/v1/runs/cfg", json=config).raise_for_status()
    spec = TraceSpec(prompts=24, epochs=4, seed=7)
    seen = replay(meds_server, "cfg", spec, ReferenceMEDS(**config))
    assert seen["rollouts"] == spec.prompts * spec.rollouts * spec.epochs


def test_fast_consistency_equals_reference_once_refits_caught_up(meds_server: str) -> None:
    httpx.put(f"{meds_server}/v1/runs/fast", json={"consistency": "fast"}).raise_for_status()

    def catch_up() -> None:
        httpx.post(f"{meds_server}/v1/runs/fast/recluster", json={}, timeout=120).raise_for_status()

    spec = TraceSpec(prompts=24, epochs=3, seed=3)
    replay(meds_server, "fast", spec, ReferenceMEDS(), between=catch_up)
