"""Concurrent trainers against one service: every request is atomic, nothing is lost or stored twice."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def bodies_of_shared_prompts() -> list[dict[str, object]]:
    """12 batches of 40 wrong rollouts over the same 5 prompts: concurrent batches contend for them."""
    rng = np.random.default_rng(0)
    return [
        {
            "rollouts": [
                {
                    "rollout_id": f"b{b}-r{r}",
                    "prompt_id": f"p{r % 5}",
                    "correct": False,
                    "fingerprint": rng.standard_normal(8).astype(np.float32).tolist(),
                }
                for r in range(40)
            ]
        }
        for b in range(12)
    ]


def send_each_twice(replicas: list[str]) -> None:
    """Every body twice, concurrently (requests alternate between replicas): one scores, the other is a
    duplicate; the memory then holds each rollout once."""
    bodies = bodies_of_shared_prompts()

    def send(numbered: tuple[int, dict[str, object]]) -> list[str]:
        i, body = numbered
        for _ in range(200):  # past the in-flight bound (4 per run) a request is refused at once: resend it
            response = httpx.post(f"{replicas[i % len(replicas)]}/v1/runs/c/score", json=body, timeout=120)
            if response.status_code != 503:
                break
            time.sleep(int(response.headers["retry-after-ms"]) / 1000)
        assert response.status_code == 200, response.text
        return [r["status"] for r in response.json()["results"]]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, enumerate(bodies + bodies)))
    flat = [s for batch in statuses for s in batch]
    assert flat.count("scored") == 12 * 40 and flat.count("duplicate") == 12 * 40
    for replica in replicas:
        stats = httpx.get(f"{replica}/v1/runs/c").json()["stats"]
        assert stats["vectors"] == stats["rollouts"] == 12 * 40 and stats["keys"] == 5


def test_concurrent_requests_and_retries_store_each_rollout_once(meds_server: str) -> None:
    send_each_twice([meds_server])


@pytest.mark.redis
def test_two_replicas_on_redis_store_each_rollout_once(
    start_server: Callable[..., str], redis_target: tuple[str, bool]
) -> None:
    url, cluster = redis_target
    settings = {"redis_url": url, "redis_cluster": cluster, "refit_processes": False, "refit_workers": 1}
    send_each_twice([start_server(**settings), start_server(**settings)])
