"""Degraded mode means degraded: batches that cannot be sent and services that hang cost a step little.

Measured before: NaN or infinite fingerprints raised a plain ValueError even with on_error="zero",
and a service that accepts connections but never answers held a score call for minutes (a 60 s
timeout per attempt, four attempts, backoff in between).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

import meds_client
from meds_client import APITimeoutError, AsyncMedsClient, MedsClient, Rollout
from tests.client._fakes import FakeService, error_response


def batch(*fingerprints: Any, rewards: list[float | None] | None = None) -> list[Rollout]:
    rewards = rewards or [None] * len(fingerprints)
    return [
        Rollout(f"r{i}", f"p{i % 2}", correct=False, fingerprint=f, reward=w)
        for i, (f, w) in enumerate(zip(fingerprints, rewards, strict=True))
    ]


def sent_ids(service: FakeService) -> list[str]:
    return [r["rollout_id"] for body in service.bodies() for r in body["rollouts"]]


@pytest.mark.parametrize(
    "bad",
    [
        np.array([1.0, np.nan], dtype=np.float32),
        np.array([np.inf, 0.0], dtype=np.float32),
        [1.0, 1e39],  # overflows float32
        np.ones((2, 1), dtype=np.float32),  # not 1-D
    ],
)
def test_unsendable_fingerprints_are_degraded_not_raised(bad: Any, service: FakeService, make_client: Any) -> None:
    good = np.array([0.5, 0.25], dtype=np.float32)
    client = make_client(on_error="zero")
    results = client.score("run-1", batch(good, bad, good))
    assert [r.status for r in results] == ["scored", "error", "scored"]
    assert [r.penalty for r in results] == [0.1, 0.0, 0.1]
    assert sent_ids(service) == ["r0", "r2"]
    assert client.stats.degraded_batches == 1 and client.stats.degraded_rollouts == 1


def test_a_non_finite_reward_is_degraded(service: FakeService, make_client: Any) -> None:
    client = make_client(on_error="zero")
    results = client.score("run-1", batch([1.0], [2.0], rewards=[float("inf"), 1.0]))
    assert [r.status for r in results] == ["error", "scored"]


def test_fingerprints_of_different_sizes_degrade_the_whole_batch(
    service: FakeService, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(on_error="zero")
    results = client.score("run-1", batch([1.0, 2.0], [1.0, 2.0, 3.0], None))
    assert [r.status for r in results] == ["error"] * 3
    assert service.requests == []
    assert client.stats.degraded_rollouts == 3
    assert "different dimensions [2, 3]" in caplog.text


def test_a_dimension_the_run_rejects_is_degraded(service: FakeService, make_client: Any) -> None:
    service.script = [error_response(400)]
    client = make_client(on_error="zero")
    assert [r.status for r in client.score("run-1", batch([1.0, 2.0], [3.0, 4.0]))] == ["error", "error"]
    assert client.stats.degraded_batches == 1


def test_invalid_ids_still_raise_in_degraded_mode(make_client: Any) -> None:
    with pytest.raises(ValueError, match="twice"):
        make_client(on_error="zero").score("run-1", [Rollout("a", "p"), Rollout("a", "q")])


def test_unsendable_fingerprints_raise_without_degraded_mode(service: FakeService, make_client: Any) -> None:
    with pytest.raises(ValueError, match="NaN"):
        make_client().score("run-1", batch([float("nan")]))
    assert service.requests == []


# -- the deadline ------------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", [0, -1.0, float("inf"), float("nan")])
def test_rejects_a_deadline_that_is_not_a_positive_number(deadline: float) -> None:
    with pytest.raises(ValueError, match="deadline"):
        MedsClient("http://meds.test", deadline=deadline)


def test_default_deadline_is_ten_seconds_at_most() -> None:
    assert MedsClient("http://meds.test").deadline == meds_client.DEFAULT_SCORE_DEADLINE <= 10.0


def test_no_retry_is_started_past_the_deadline(service: FakeService, make_client: Any) -> None:
    service.script = [error_response(503, headers={"Retry-After": "5"})] * 2
    client = make_client(on_error="zero", deadline=1.0)
    assert [r.status for r in client.score("run-1", batch([1.0]))] == ["error"]
    assert len(service.requests) == 1 and client.slept == []


def test_chunks_left_when_the_deadline_passes_are_not_sent(service: FakeService, make_client: Any) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        time.sleep(0.3)
        return service.default(request)

    service.script = [slow] * 3
    client = make_client(on_error="zero", deadline=0.5, max_batch_rollouts=1)
    results = client.score("run-1", [Rollout(f"r{i}", f"p{i}", fingerprint=[1.0]) for i in range(3)])
    assert [r.status for r in results] == ["scored", "scored", "error"]
    assert len(service.requests) == 2


@pytest.fixture
def hanging_service() -> Iterator[str]:
    """A TCP port that accepts connections (in the backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_hanging_service_costs_a_score_call_the_deadline(hanging_service: str, kind: str) -> None:
    started = time.monotonic()
    if kind == "sync":
        with MedsClient(hanging_service, on_error="zero", deadline=1.0) as client:
            results = client.score("run-1", batch([1.0]))
    else:

        async def score() -> Any:
            async with AsyncMedsClient(hanging_service, on_error="zero", deadline=1.0) as client:
                return await client.score("run-1", batch([1.0]))

        results = asyncio.run(score())
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == ["error"]
    assert 0.9 <= elapsed < 2.5  # four attempts of the 60 s default timeout would take minutes


def test_a_hanging_service_raises_a_timeout_without_degraded_mode(hanging_service: str) -> None:
    with MedsClient(hanging_service, deadline=0.5) as client, pytest.raises(APITimeoutError):
        client.score("run-1", batch([1.0]))
