"""Scale-out on one Redis: two API replicas and refit workers give the reference's penalties."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from harness.redis_server import RedisServer
from harness.reference import ReferenceMEDS, assert_matches_reference
from harness.server import ProcessServer, ProcessWorker, wait_for
from meds_service.storage.redis import GROUP, STREAM
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def api(tmp_path: Path, name: str, redis_url: str, **env: str) -> ProcessServer:
    values = {"MEDS_REDIS_URL": redis_url, "MEDS_REFIT_BACKGROUND": "false", "MEDS_REFIT_WORKERS": "1", **env}
    return ProcessServer(tmp_path / name, env=values)


def claimed(queue: redis.Redis) -> int:
    """Refit jobs delivered to a consumer and not acknowledged (0 before any worker made the group)."""
    try:
        return int(queue.xpending(STREAM, GROUP)["pending"])
    except redis.exceptions.ResponseError:
        return 0


def kill_holding_jobs(worker: ProcessWorker, queue: redis.Redis, timeout: float = 180.0) -> None:
    """SIGKILL the worker (and its refit processes) at a moment it holds claimed, unacknowledged jobs. It is
    stopped (SIGSTOP) before the count is read, so it cannot acknowledge them between the check and the kill:
    a worker killed just after finishing its round would leave nothing to recover, and test nothing."""
    assert worker.proc is not None
    deadline = time.monotonic() + timeout  # its first claim can be slow to come under load
    while time.monotonic() < deadline:
        if claimed(queue) > 0:
            os.killpg(worker.proc.pid, signal.SIGSTOP)
            if claimed(queue) > 0:
                worker.kill()
                return
            os.killpg(worker.proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker was never caught holding claimed jobs")


def test_two_replicas_and_a_worker_match_the_reference(tmp_path: Path, redis_server: RedisServer) -> None:
    replicas = [api(tmp_path, "a", redis_server.url), api(tmp_path, "b", redis_server.url)]
    worker = ProcessWorker(tmp_path / "w", env={"MEDS_REDIS_URL": redis_server.url, "MEDS_REFIT_WORKERS": "1"})
    for process in (*replicas, worker):
        process.start()
    try:
        reference = ReferenceMEDS()
        spec = TraceSpec(prompts=24, epochs=5, prompts_per_step=8, seed=21)
        for i, step in enumerate(trace_steps(spec)):
            replica = replicas[i % 2]  # steps alternate between the replicas
            response = httpx.post(f"{replica.base_url}/v1/runs/shared/score", json=to_wire(step), timeout=120)
            assert response.status_code == 200, response.text
            assert_matches_reference(response.json()["results"], reference.step(step))
        # The worker drains the queue; both replicas then see the same fitted memory.
        wait_for(lambda: httpx.get(f"{replicas[0].base_url}/v1/runs/shared").json()["stats"]["pending_refits"] == 0)
        views = [httpx.get(f"{r.base_url}/v1/runs/shared/prompts/prompt-3").json() for r in replicas]
        assert views[0] == views[1]
        wrong = views[0]["groups"]["wrong"]
        assert wrong["fitted"] == wrong["vectors"] > 0
        stats = [httpx.get(f"{r.base_url}/v1/runs/shared").json()["stats"] for r in replicas]
        assert (
            stats[0]["vectors"]
            == stats[1]["vectors"]
            == sum(1 for step in trace_steps(spec) for r in step if r.fingerprint is not None)
        )
    finally:
        for process in (*replicas, worker):
            process.stop()


def test_a_worker_killed_mid_refit_loses_no_refit(tmp_path: Path, redis_server: RedisServer) -> None:
    server = api(tmp_path, "a", redis_server.url)
    env = {"MEDS_REDIS_URL": redis_server.url, "MEDS_REFIT_WORKERS": "1", "MEDS_REFIT_CLAIM_IDLE_S": "1",
           "MEDS_REFIT_QUEUE_BATCH": "8"}  # fmt: skip
    server.start()
    first = ProcessWorker(tmp_path / "w1", env=env)
    try:
        # Big, high-dimensional keys make refits slow enough to kill the worker in the middle of a round.
        spec = TraceSpec(prompts=16, rollouts=64, epochs=4, dim=96, prompts_per_step=16, seed=5, p_no_fingerprint=0.0)
        for step in trace_steps(spec):
            httpx.post(f"{server.base_url}/v1/runs/big/score", json=to_wire(step), timeout=120).raise_for_status()
        assert httpx.get(f"{server.base_url}/v1/runs/big").json()["stats"]["pending_refits"] > 0
        queue = redis.Redis.from_url(redis_server.url)
        first.start()
        kill_holding_jobs(first, queue)
        assert claimed(queue) > 0
        second = ProcessWorker(tmp_path / "w2", env=env)
        second.start()
        try:
            wait_for(lambda: httpx.get(f"{server.base_url}/v1/runs/big").json()["stats"]["pending_refits"] == 0)
        finally:
            second.stop()
        for p in range(spec.prompts):
            view = httpx.get(f"{server.base_url}/v1/runs/big/prompts/prompt-{p}").json()["groups"]
            for name in ("wrong", "unknown"):  # the groups the default target fits
                if name in view:
                    assert view[name]["fitted"] == view[name]["vectors"] and not view[name]["pending_refit"]
    finally:
        first.kill()
        server.stop()
