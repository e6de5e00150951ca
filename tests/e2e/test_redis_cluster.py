"""The service on a real 3-master Redis Cluster (`MEDS_REDIS_CLUSTER=true`): every route answers, and an
outage of the cluster (or of one of its masters) answers 503 + Retry-After, then recovers by itself."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from harness.reference import ReferenceMEDS, assert_matches_reference
from harness.server import wait_for, wait_ready
from tests.support.redis_cluster import RedisClusterServer
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = pytest.mark.redis


def cluster_server(start_server: Callable[..., str], url: str, **overrides: object) -> str:
    settings: dict[str, object] = {"refit_processes": False, "refit_workers": 1, **overrides}
    return start_server(redis_url=url, redis_cluster=True, **settings)


def test_scores_on_a_redis_cluster(start_server: Callable[..., str], redis_cluster_url: str) -> None:
    # Refits in a worker process, which opens the cluster from the store's spec.
    base = cluster_server(start_server, redis_cluster_url, refit_processes=True)
    reference = ReferenceMEDS()
    for step in trace_steps(TraceSpec(prompts=6, rollouts=8, epochs=2, prompts_per_step=3, seed=4)):
        response = httpx.post(f"{base}/v1/runs/c/score", json=to_wire(step), timeout=60)
        assert response.status_code == 200, response.text
        assert_matches_reference(response.json()["results"], reference.step(step))
    wait_for(lambda: httpx.get(f"{base}/v1/runs/c").json()["stats"]["pending_refits"] == 0, 60)
    view = httpx.get(f"{base}/v1/runs/c/prompts/prompt-0").json()["groups"]["wrong"]
    assert view["fitted"] == view["vectors"] > 0


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServer]:
    """A cluster of this test's own, which it may SIGKILL and restart."""
    cluster = RedisClusterServer(tmp_path / "cluster")
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_a_cluster_outage_answers_503_and_recovers(
    start_server: Callable[..., str], own_cluster: RedisClusterServer
) -> None:
    base = cluster_server(start_server, own_cluster.url, redis_timeout_s=1.0)
    reference = ReferenceMEDS()
    steps = list(trace_steps(TraceSpec(prompts=6, rollouts=8, epochs=3, prompts_per_step=6, seed=9)))
    acked = 0
    for i, step in enumerate(steps):
        expected = reference.step(step)
        url = f"{base}/v1/runs/o/score"
        if i in (1, 2):
            if i == 1:
                own_cluster.nodes[1].kill()  # one master down: the batch touches its slots
            else:
                own_cluster.kill()  # every master down
            started = time.monotonic()
            down = httpx.post(url, json=to_wire(step), timeout=60)
            assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
            assert time.monotonic() - started < 15
            if i == 2:
                assert httpx.get(f"{base}/readyz", timeout=30).status_code == 503
                assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
            own_cluster.restart()
            wait_ready(base, 30)
            stats = httpx.get(f"{base}/v1/runs/o", timeout=30).json()["stats"]
            assert stats["vectors"] == stats["rollouts"] == acked
        response = httpx.post(url, json=to_wire(step), timeout=60)
        assert response.status_code == 200, response.text
        assert_matches_reference(response.json()["results"], expected)
        acked += sum(1 for r in step if r.fingerprint is not None)
