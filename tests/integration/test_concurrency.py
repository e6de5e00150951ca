"""Concurrent trainers against one service: every request is atomic, nothing is lost or stored twice."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_concurrent_requests_and_retries_store_each_rollout_once(meds_server: str) -> None:
    rng = np.random.default_rng(0)
    bodies = [
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

    def send(body: dict[str, object]) -> list[str]:
        response = httpx.post(f"{meds_server}/v1/runs/c/score", json=body, timeout=120)
        assert response.status_code == 200
        return [r["status"] for r in response.json()["results"]]

    with ThreadPoolExecutor(8) as pool:  # every body twice, concurrently: one scores, the other is a duplicate
        statuses = list(pool.map(send, bodies + bodies))
    flat = [s for batch in statuses for s in batch]
    assert flat.count("scored") == 12 * 40 and flat.count("duplicate") == 12 * 40
    stats = httpx.get(f"{meds_server}/v1/runs/c").json()["stats"]
    assert stats["vectors"] == stats["rollouts"] == 12 * 40 and stats["keys"] == 5
