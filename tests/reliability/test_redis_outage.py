"""SIGKILL redis-server mid-run: nothing acknowledged is lost, the service answers 503 + Retry-After while
Redis is down (no 500, no hang), /readyz fails, and it recovers by itself with exact penalties."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness.redis_server import RedisServer
from harness.reference import ReferenceMEDS, assert_matches_reference
from harness.server import ProcessServer, wait_ready
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_redis_sigkill_and_recovery(tmp_path: Path, redis_server: RedisServer) -> None:
    server = ProcessServer(tmp_path / "api", env={"MEDS_REDIS_URL": redis_server.url, "MEDS_REDIS_TIMEOUT_S": "2"})
    server.start()
    url = f"{server.base_url}/v1/runs/r/score"
    try:
        reference = ReferenceMEDS()
        steps = list(trace_steps(TraceSpec(prompts=24, epochs=5, prompts_per_step=8, seed=31)))
        acked = 0
        for i, step in enumerate(steps):
            expected = reference.step(step)
            body = to_wire(step)
            if i in (4, 9):  # Redis dies between two acknowledged steps
                redis_server.kill()
                started = time.monotonic()
                down = httpx.post(url, json=body, timeout=30)
                assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1
                assert down.json()["error"]["type"] == "unavailable"
                assert time.monotonic() - started < 15
                assert httpx.get(f"{server.base_url}/readyz", timeout=30).status_code == 503
                assert httpx.get(f"{server.base_url}/healthz", timeout=30).status_code == 200
                redis_server.start()  # same port and folder: the AOF brings everything back
                wait_ready(server.base_url, 30)
                stats = httpx.get(f"{server.base_url}/v1/runs/r", timeout=30).json()["stats"]
                assert stats["vectors"] == stats["rollouts"] == acked
            if i == 12:  # Redis dies while a request is in flight: the retry gets the same values
                sender = threading.Thread(target=_send_ignoring_errors, args=(url, body))
                sender.start()
                time.sleep(0.05)
                redis_server.kill()
                sender.join(60)
                redis_server.start()
            response = httpx.post(url, json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert_matches_reference(response.json()["results"], expected)
            acked += sum(1 for r in step if r.fingerprint is not None)
        stats = httpx.get(f"{server.base_url}/v1/runs/r", timeout=30).json()["stats"]
        assert stats["vectors"] == acked
    finally:
        server.stop()


def _send_ignoring_errors(url: str, body: object) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=body, timeout=60)
