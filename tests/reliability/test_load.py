"""Load: eight trainers scoring at once against a real `meds serve` with small in-flight bounds. Every
request is answered in the end (the service refuses past the bounds with 503 + Retry-After, the client's
retries absorb it), and the refits the load left pending drain once it stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.bench_load import Load, report, run_segment
from harness.server import ProcessServer
from meds_client import RetryPolicy

pytestmark = pytest.mark.slow

CLIENTS = 8
SECONDS = 12.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ProcessServer]:
    """`meds serve` admitting two score requests per run (the default is 4) and refitting in the background."""
    env = {"MEDS_LOG_LEVEL": "warning", "MEDS_MAX_INFLIGHT_PER_RUN": "2", "MEDS_MAX_INFLIGHT_TOTAL": "32"}
    process = ProcessServer(tmp_path / "data", env=env)
    process.start()
    yield process
    process.stop()


def test_eight_clients_all_answered_refusals_absorbed_and_refits_drain(server: ProcessServer) -> None:
    # Retries without a deadline, as a trainer that must not lose a step would configure them.
    load = Load(CLIENTS, SECONDS, retries=RetryPolicy(max_retries=100, max_delay=1.0), drain_timeout=180.0)
    result = run_segment(server, load)
    print(report(result))
    assert result["failed_calls"] == 0
    assert result["calls"] >= CLIENTS  # every client got answers
    assert result["refusals"]["run"] > 0  # eight clients against a bound of two: refused at once...
    assert result["client_retries"] >= result["refusals"]["run"]  # ...and every refusal retried by the client
    assert result["pending_refits"]["drain_s"] is not None  # bounded: all refitted once ingest stopped
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        stats = http.get(f"/v1/runs/{result['run']}").json()["stats"]
        assert stats["pending_refits"] == 0 and stats["rollouts"] == result["calls"] * 512
        assert "meds_score_in_flight 0.0" in http.get("/metrics").text
