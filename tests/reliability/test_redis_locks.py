"""Prompt locks between two real `meds serve` replicas on one real redis-server: a replica SIGKILLed while
it holds a batch's locks frees its prompts within a lease, and a replica paused past its lease has its
commit refused (503) while the lock's next owner stores the batch, once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from harness.redis_server import RedisServer
from harness.server import ProcessServer, wait_for
from meds_service.storage.redis import RedisStore
from tests.support.slow_commit import SlowCommitServer
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RUN = "r"


@pytest.fixture
def steps() -> list[dict[str, object]]:
    """Two steps on disjoint prompts: one to warm the surviving replica up, one to contend for."""
    spec = TraceSpec(prompts=8, rollouts=8, epochs=1, prompts_per_step=4, seed=5)
    return [to_wire(step) for step in trace_steps(spec)][:2]


def fingerprinted(body: dict[str, object]) -> int:
    return sum(1 for r in body["rollouts"] if r["fingerprint"] is not None)  # type: ignore[attr-defined]


def lock_names(body: dict[str, object]) -> list[str]:
    prompts = {r["prompt_id"] for r in body["rollouts"]}  # type: ignore[attr-defined]
    return [RedisStore._prompt_key(RUN, prompt, "lock") for prompt in sorted(prompts)]


@pytest.fixture
def replicas(
    tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> Iterator[tuple[SlowCommitServer, ProcessServer]]:
    """A replica whose commits wait `delay_s` (the marker's), and a plain one; refits in threads, to spare cores."""
    delay_s, lease_s = request.param
    env = {"MEDS_REDIS_URL": redis_server.url, "MEDS_REFIT_PROCESSES": "false", "MEDS_REFIT_WORKERS": "1",
           "MEDS_LOCK_LEASE_S": str(lease_s)}  # fmt: skip
    slow = SlowCommitServer(tmp_path / "slow", delay_s, env)
    plain = ProcessServer(tmp_path / "plain", env)
    try:
        slow.start()
        plain.start()
        yield slow, plain
    finally:
        if slow.proc is not None and slow.proc.poll() is None:
            os.killpg(slow.proc.pid, signal.SIGCONT)
        slow.stop()
        plain.stop()


def send_in_background(url: str, body: dict[str, object]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the replica was killed under it
            answers.append(httpx.post(url, json=body, timeout=120))

    sender = threading.Thread(target=send)
    sender.start()
    return sender, answers


def wait_until_locked(redis_server: RedisServer, body: dict[str, object]) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        wait_for(lambda: client.exists(*lock_names(body)) == len(lock_names(body)), timeout=60)
    finally:
        client.close()


@pytest.mark.parametrize("replicas", [(600.0, 3.0)], indirect=True)  # the default lease
def test_a_killed_replicas_prompts_are_free_within_seconds(
    replicas: tuple[SlowCommitServer, ProcessServer], redis_server: RedisServer, steps: list[dict[str, object]]
) -> None:
    slow, plain = replicas
    warm, contested = steps
    assert httpx.post(f"{plain.base_url}/v1/runs/{RUN}/score", json=warm, timeout=60).status_code == 200
    sender, _ = send_in_background(f"{slow.base_url}/v1/runs/{RUN}/score", contested)
    wait_until_locked(redis_server, contested)
    slow.kill()
    killed = time.monotonic()
    response = httpx.post(f"{plain.base_url}/v1/runs/{RUN}/score", json=contested, timeout=60)
    elapsed = time.monotonic() - killed
    sender.join(30)
    assert response.status_code == 200, response.text
    assert elapsed < 5.0, f"the killed replica's prompts were blocked for {elapsed:.1f} s"
    stats = httpx.get(f"{plain.base_url}/v1/runs/{RUN}", timeout=30).json()["stats"]
    assert stats["vectors"] == fingerprinted(warm) + fingerprinted(contested)


# The commit waits 15 s, so that the pause surely falls before it even when a loaded machine is slow to see
# the locks taken (a pause after the commit would test nothing).
@pytest.mark.parametrize("replicas", [(15.0, 1.0)], indirect=True)
def test_a_replica_paused_past_its_lease_has_its_commit_refused(
    replicas: tuple[SlowCommitServer, ProcessServer], redis_server: RedisServer, steps: list[dict[str, object]]
) -> None:
    slow, plain = replicas
    _, contested = steps
    assert slow.proc is not None
    sender, answers = send_in_background(f"{slow.base_url}/v1/runs/{RUN}/score", contested)
    wait_until_locked(redis_server, contested)
    os.killpg(slow.proc.pid, signal.SIGSTOP)  # a stall: no thread of it runs, its renewals neither
    try:
        time.sleep(2.0)  # two leases
        before = httpx.get(f"{plain.base_url}/v1/runs/{RUN}", timeout=30).json()["stats"]["vectors"]
        assert before == 0, "the paused replica had committed already: the pause came too late"
        response = httpx.post(f"{plain.base_url}/v1/runs/{RUN}/score", json=contested, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        os.killpg(slow.proc.pid, signal.SIGCONT)
    sender.join(60)
    assert len(answers) == 1
    late = answers[0]
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
    assert "lease expired" in late.json()["error"]["message"]
    stats = httpx.get(f"{plain.base_url}/v1/runs/{RUN}", timeout=30).json()["stats"]
    assert stats["vectors"] == fingerprinted(contested)  # stored once, by the lock's new owner
    retry = httpx.post(f"{slow.base_url}/v1/runs/{RUN}/score", json=contested, timeout=60)
    assert retry.status_code == 200  # the client's retry gets the stored results
    penalties = [(r["rollout_id"], r["penalty"]) for r in retry.json()["results"]]
    assert penalties == [(r["rollout_id"], r["penalty"]) for r in response.json()["results"]]
    assert httpx.get(f"{plain.base_url}/v1/runs/{RUN}", timeout=30).json()["stats"]["vectors"] == fingerprinted(
        contested
    )
