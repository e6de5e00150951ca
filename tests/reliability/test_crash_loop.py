"""A crash loop: armed fault points SIGKILL the service inside its commits and between a commit and its
answer, again and again, while a trainer's client keeps scoring through its retries. Every rollout is
applied exactly once, and every answer is the reference's (a retried rollout that had been committed
comes back `duplicate` with its first results).

Each start of the service is armed with one point of a schedule, to fire on a chosen hit (`@N`), so the
kills are spread over the whole trace and fall at the same moments on every run. A supervisor thread
restarts the service whenever it dies; once the schedule is used up it runs unarmed to the end.
"""

from __future__ import annotations

import re
import signal
import threading
import warnings
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

SPEC = TraceSpec(prompts=16, epochs=4, prompts_per_step=4, seed=23)  # 16 steps of 64 rollouts
RUN = "crash"
# (point, hit) per start: each start answers a request or two, then dies at that point.
SCHEDULES = {
    "sqlite": [
        ("sqlite.commit.after_write", 2),
        ("score.before_ack", 3),
        ("sqlite.commit.after_commit", 2),
        ("sqlite.commit.after_write", 3),
        ("score.before_ack", 2),
        ("sqlite.commit.after_commit", 3),
    ],
    # A replica killed inside its commit holds its prompt locks until they expire (the lock TTL); retries of
    # those prompts meanwhile get 503 + Retry-After. Two such kills, the others after the locks are gone.
    "redis": [
        ("redis.commit.before_script", 2),
        ("score.before_ack", 2),
        ("score.before_ack", 3),
        ("redis.commit.after_script", 2),
        ("score.before_ack", 2),
        ("score.before_ack", 3),
    ],
}
# The service comes back within seconds: retry often, for as long as it takes.
RETRIES = RetryPolicy(max_retries=10_000, initial_delay=0.05, max_delay=0.5, jitter=0.0)


class Supervisor:
    """Restarts the service whenever it dies, start i armed with `schedule[i]`, and records each death."""

    def __init__(self, server: ForkedServer, schedule: list[tuple[str, int]]) -> None:
        self.server, self.schedule = server, schedule
        self.deaths: list[int] = []  # the signal that ended each run of the service
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def env(self) -> dict[str, str]:
        start = len(self.deaths)
        armed = f"{self.schedule[start][0]}:@{self.schedule[start][1]}" if start < len(self.schedule) else ""
        return {"MEDS_FAULT_POINTS": armed}

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
        if self._thread.ident is None:  # never started
            return
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
        # A short lock wait: a retry that meets a killed replica's locks gets its 503 soon, and retries.
        yield "redis", {"MEDS_REDIS_URL": redis.url, "MEDS_LOCK_WAIT_S": "2"}
    finally:
        redis.stop()


def test_crash_loop_applies_every_rollout_once_with_reference_penalties(
    tmp_path: Path, store: tuple[str, dict[str, str]]
) -> None:
    backend, store_env = store
    log = tmp_path / "service.log"
    # Refits in threads: worker processes would have to be warmed up again at every restart.
    env = {**store_env, "MEDS_REFIT_PROCESSES": "false", "MEDS_REFIT_WORKERS": "1", "MEDS_REFIT_INTERVAL_S": "0.05"}
    steps = list(trace_steps(SPEC))
    schedule = SCHEDULES[backend]
    server = ForkedServer(tmp_path / "data", log, env)
    supervisor = Supervisor(server, schedule)
    statuses: set[str] = set()
    try:
        reference = ReferenceMEDS()
        expected = [reference.step(step) for step in steps]  # while the zygote imports the service
        supervisor.start()
        with MedsClient(server.base_url, retries=RETRIES, deadline=None, timeout=60) as client:
            for step, want in zip(steps, expected, strict=True):
                results = [as_wire(r) for r in client.score(RUN, rollouts(step))]
                assert [r["rollout_id"] for r in results] == [r.rollout_id for r in step]
                statuses.update(r["status"] for r in results)
                assert_matches_reference(results, want)
            stats = client.get_run(RUN).stats
            retries = client.stats.retries
    finally:
        try:
            supervisor.stop()
        finally:
            server.close()

    for failure in server.failed_starts:  # retried by ForkedServer.start; reported with what became of it
        warnings.warn(f"a forked restart of the service was not ready and was retried: {failure}", stacklevel=1)
    # The kills: one SIGKILL per scheduled point, each by that point on its hit, and nothing else died.
    assert supervisor.deaths == [signal.SIGKILL] * len(schedule)
    fired = [
        (name, int(hit)) for name, hit in re.findall(r"meds: fault point (\S+) fired on hit (\d+)", log.read_text())
    ]
    assert fired == schedule
    assert retries >= len(schedule)  # each kill cost the client at least one resend
    assert not re.search(r'"status":5(?!03)\d\d', log.read_text())  # waits for a dead replica's locks: 503 only
    # Some retried batches had been committed before the kill: they came back as duplicates, exactly.
    assert statuses <= {"scored", "skipped", "duplicate"} and "duplicate" in statuses

    # Exactly once: the stored counts are those of the trace's distinct rollouts and keys.
    stored = [r for step in steps for r in step if r.fingerprint is not None]
    assert len({r.rollout_id for r in stored}) == len(stored)
    keys = {(r.prompt_id, r.correct) for r in stored}
    assert stats["rollouts"] == stats["vectors"] == len(stored)
    assert stats["keys"] == len(keys)
