"""A crash loop: armed fault points SIGKILL the service inside its commits and between a commit and its
answer, again and again, while a trainer's client keeps scoring through its retries. Every rollout is
applied exactly once, and every answer is the reference's (a retried rollout that had been committed
comes back `duplicate` with its first results).

Each start draws from a seed of its own (MEDS_FAULT_SEED = the start's number), so the kills fall at the
same hits on every run of the test. A supervisor thread restarts the service whenever it dies, with the
points armed until KILLS kills, then unarmed so that the run finishes.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.redis_server import RedisServer
from harness.reference import ReferenceMEDS, RefRollout, assert_matches_reference
from meds_client import MedsClient, RetryPolicy, Rollout
from tests.support.forked_server import ForkedServer
from tests.support.trace import TraceSpec, trace_steps

pytestmark = pytest.mark.slow

SPEC = TraceSpec(prompts=16, epochs=4, prompts_per_step=4, seed=23)
KILLS = 6
RUN = "crash"
COMMIT_POINTS = {
    "sqlite": "sqlite.commit.after_write:0.2,sqlite.commit.after_commit:0.2",
    "redis": "redis.commit.before_script:0.2,redis.commit.after_script:0.2",
}
ACK_POINT = "score.before_ack:0.2"
# The service comes back within seconds: retry often, for as long as it takes.
RETRIES = RetryPolicy(max_retries=10_000, initial_delay=0.05, max_delay=0.5, jitter=0.0)


class Supervisor:
    """Restarts the service whenever it dies, armed with `points` until `kills` SIGKILLs, and counts them."""

    def __init__(self, server: ForkedServer, points: str, kills: int) -> None:
        self.server, self.points, self.kills = server, points, kills
        self.deaths: list[int] = []  # the signal that ended each run of the service
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def env(self) -> dict[str, str]:
        armed = len(self.deaths) < self.kills
        return {"MEDS_FAULT_POINTS": self.points if armed else "", "MEDS_FAULT_SEED": str(len(self.deaths))}

    def start(self) -> None:
        self.server.start(self.env())
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                ended_by = self.server.wait()
                if self._stopping.is_set():
                    return
                self.deaths.append(ended_by)
                self.server.start(self.env())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self._stopping.set()
        self.server.terminate()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the supervisor did not stop"
        if self.error is not None:
            raise self.error


def rollouts(step: list[RefRollout]) -> list[Rollout]:
    return [Rollout(r.rollout_id, r.prompt_id, r.correct, r.fingerprint, r.reward) for r in step]


def as_wire(result: Any) -> dict[str, Any]:
    return {
        "rollout_id": result.rollout_id,
        "status": result.status,
        "cluster_size": result.cluster_size,
        "penalty": result.penalty,
        "shaped_reward": result.shaped_reward,
    }


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The store variant and the environment that selects it (Redis: a real redis-server that stays up)."""
    if request.param == "sqlite":
        yield "sqlite", {}
        return
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        yield "redis", {"MEDS_REDIS_URL": redis.url}
    finally:
        redis.stop()


def test_crash_loop_applies_every_rollout_once_with_reference_penalties(
    tmp_path: Path, store: tuple[str, dict[str, str]]
) -> None:
    backend, store_env = store
    log = tmp_path / "service.log"
    # Refits in threads: worker processes would have to be warmed up again at every restart.
    env = {**store_env, "MEDS_REFIT_PROCESSES": "false", "MEDS_REFIT_WORKERS": "1", "MEDS_REFIT_INTERVAL_S": "0.05"}
    server = ForkedServer(tmp_path / "data", log, env)
    supervisor = Supervisor(server, f"{COMMIT_POINTS[backend]},{ACK_POINT}", KILLS)
    steps = list(trace_steps(SPEC))
    reference = ReferenceMEDS()
    statuses: set[str] = set()
    try:
        supervisor.start()
        with MedsClient(server.base_url, retries=RETRIES, deadline=None, timeout=60) as client:
            for step in steps:
                results = [as_wire(r) for r in client.score(RUN, rollouts(step))]
                assert [r["rollout_id"] for r in results] == [r.rollout_id for r in step]
                statuses.update(r["status"] for r in results)
                assert_matches_reference(results, reference.step(step))
            stats = client.get_run(RUN).stats
            retries = client.stats.retries
    finally:
        try:
            supervisor.stop()
        finally:
            server.close()

    # The kills: all SIGKILLs by the armed points, as many as asked for, at more than one point.
    assert supervisor.deaths == [signal.SIGKILL] * KILLS
    fired = re.findall(r"meds: fault point (\S+) fired", log.read_text())
    assert len(fired) == KILLS
    assert len(set(fired)) >= 2, fired
    assert retries >= KILLS  # each kill cost the client at least one resend
    # Some retried batches had been committed before the kill: they came back as duplicates, exactly.
    assert statuses <= {"scored", "skipped", "duplicate"} and "duplicate" in statuses

    # Exactly once: the stored counts are those of the trace's distinct rollouts and keys.
    stored = [r for step in steps for r in step if r.fingerprint is not None]
    assert len({r.rollout_id for r in stored}) == len(stored)
    keys = {(r.prompt_id, r.correct) for r in stored}
    assert stats["rollouts"] == stats["vectors"] == len(stored)
    assert stats["keys"] == len(keys)
