"""The service on a real 3-master Redis Cluster (`MEDS_REDIS_CLUSTER=true`) answers every route."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.support.reference import ReferenceMEDS, assert_matches_reference
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = pytest.mark.redis


def test_scores_on_a_redis_cluster(start_server: Callable[..., str], redis_cluster_url: str) -> None:
    base = start_server(redis_url=redis_cluster_url, redis_cluster=True, refit_processes=False, refit_workers=1)
    reference = ReferenceMEDS()
    for step in trace_steps(TraceSpec(prompts=6, rollouts=8, epochs=2, prompts_per_step=3, seed=4)):
        response = httpx.post(f"{base}/v1/runs/c/score", json=to_wire(step), timeout=60)
        assert response.status_code == 200, response.text
        assert_matches_reference(response.json()["results"], reference.step(step))
