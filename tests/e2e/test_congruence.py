"""Congruence: one multi-epoch trace gives the same answers, field for field, on every store set-up.

In the manner of qdrant-client's local-vs-remote congruence tests, the same requests go to four
deployments of real uvicorn servers, and every answer is compared across them and with the plain
reference implementation (harness/reference.py):

- `sqlite`: the embedded store, refits in the background;
- `redis`: one replica on a single Redis, refits in the background;
- `redis-scaled`: two replicas on one Redis, steps alternating between them, refits left to a `meds worker`;
- `redis-cluster`: two replicas on a real 3-master Redis Cluster, refits left to a `meds worker`.

After the trace, once every refit is done, the run's stats, the GET view of every prompt and the run
listing are equal everywhere, and deleting the run deletes it everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.reference import ReferenceMEDS, RefResult, RefRollout
from harness.server import ProcessWorker, wait_for
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# Two runs side by side: the default config, and one that fits every group and forgets old vectors (so the
# stores' trimming of a key's vectors is compared too).
RUNS: dict[str, dict[str, Any]] = {
    "default": {},
    "capped": {"penalty_target": "both", "max_memory_per_key": 24, "knn_k": 5},
}
SPEC = TraceSpec(prompts=24, epochs=5, prompts_per_step=8, seed=13)
FIELDS = ("status", "cluster", "cluster_size", "penalty", "shaped_reward")


@dataclass
class Deployment:
    name: str
    replicas: list[httpx.Client]  # steps alternate between them

    def post(self, run: str, step_index: int, body: dict[str, object]) -> list[dict[str, Any]]:
        response = self.replicas[step_index % len(self.replicas)].post(f"/v1/runs/{run}/score", json=body)
        assert response.status_code == 200, f"{self.name}: {response.text}"
        results: list[dict[str, Any]] = response.json()["results"]
        return results

    def get(self, path: str) -> Any:
        """The same view from every replica of this deployment (they share one store)."""
        views = [replica.get(path).json() for replica in self.replicas]
        assert all(view == views[0] for view in views), f"{self.name}: replicas disagree on {path}"
        return views[0]

    def settled(self) -> bool:
        """Every replica sees no refit pending or in flight. Read without `get`'s agreement check: while a
        worker is still saving fits, two reads a moment apart may rightly differ."""
        stats = [replica.get(f"/v1/runs/{run}").json()["stats"] for replica in self.replicas for run in RUNS]
        return all(s["pending_refits"] == 0 and s["refits_in_flight"] == 0 for s in stats)


@pytest.fixture
def deployments(
    tmp_path: Path, start_server: Callable[..., str], redis_url: str, redis_cluster_url: str
) -> Iterator[list[Deployment]]:
    # The two Redis set-ups with a worker each get a Redis of their own: the refit queue is store-wide.
    scaled_url = redis_url.rsplit("/", 1)[0] + "/1"
    with ExitStack() as stack:

        def replicas(name: str, count: int, **settings: Any) -> list[httpx.Client]:
            urls = [start_server(data_dir=tmp_path / f"{name}-{i}", refit_processes=False, refit_workers=1,
                                 **settings) for i in range(count)]  # fmt: skip
            return [stack.enter_context(httpx.Client(base_url=url, timeout=120)) for url in urls]

        def worker(name: str, url: str, cluster: bool) -> None:
            process = ProcessWorker(tmp_path / name, env={
                "MEDS_REDIS_URL": url, "MEDS_REDIS_CLUSTER": str(cluster).lower(), "MEDS_REFIT_WORKERS": "1",
                "MEDS_REFIT_PROCESSES": "false", "MEDS_WORKER_METRICS_PORT": "0",
            })  # fmt: skip
            stack.callback(process.stop)
            process.start()

        worker("worker-scaled", scaled_url, cluster=False)
        worker("worker-cluster", redis_cluster_url, cluster=True)
        cluster = {"redis_cluster": True, "refit_background": False}
        yield [
            Deployment("sqlite", replicas("sqlite", 1)),
            Deployment("redis", replicas("redis", 1, redis_url=redis_url)),
            Deployment("redis-scaled", replicas("scaled", 2, redis_url=scaled_url, refit_background=False)),
            Deployment("redis-cluster", replicas("cluster", 2, redis_url=redis_cluster_url, **cluster)),
        ]


def reference_fields(rollout: RefRollout, want: RefResult, target: str) -> tuple[object, ...]:
    """The reference's answer in the service's fields. The service fits (and so reports a cluster for) only
    the groups the penalty target covers; the reference labels every group."""
    status = "skipped" if rollout.fingerprint is None else "scored"
    fitted = target == "both" or (rollout.correct is not True and target == "wrong")
    return (status, want.cluster if fitted else None, want.cluster_size, want.penalty, want.shaped_reward)


def test_every_store_gives_the_same_answers(deployments: list[Deployment]) -> None:
    for run, config in RUNS.items():
        for deployment in deployments:
            assert deployment.replicas[0].put(f"/v1/runs/{run}", json=config).status_code == 201, deployment.name
    references = {run: ReferenceMEDS(**config) for run, config in RUNS.items()}
    seen = {"rollouts": 0, "penalised": 0, "clusters": 0}
    for i, step in enumerate(trace_steps(SPEC)):
        body = to_wire(step)
        for run, reference in references.items():
            expected = reference.step(step)
            answers = {d.name: d.post(run, i, body) for d in deployments}
            for name, results in answers.items():
                assert [r["rollout_id"] for r in results] == [r.rollout_id for r in step], name
            for j, rollout in enumerate(step):
                want = reference_fields(rollout, expected[rollout.rollout_id], reference.penalty_target)
                for name, results in answers.items():
                    got = tuple(results[j][f] for f in FIELDS)
                    assert got == want, f"{name}/{run}/{rollout.rollout_id}: {got} != {want} ({FIELDS})"
                seen["rollouts"] += 1
                seen["penalised"] += want[3] > 0
                seen["clusters"] += want[1] is not None and want[1] >= 0
    # The trace exercises the paths that could differ: penalties, real clusters.
    assert seen["rollouts"] == len(RUNS) * SPEC.prompts * SPEC.rollouts * SPEC.epochs
    assert seen["penalised"] > 500 and seen["clusters"] > 500

    for deployment in deployments:
        wait_for(deployment.settled, 60)
    first, *others = deployments
    stored = sum(1 for step in trace_steps(SPEC) for r in step if r.fingerprint is not None)
    for run in RUNS:
        stats = first.get(f"/v1/runs/{run}")["stats"]
        assert stats["rollouts"] == stored and 0 < stats["vectors"] <= stored
        for deployment in others:
            assert deployment.get(f"/v1/runs/{run}")["stats"] == stats, (deployment.name, run)
        for p in range(SPEC.prompts):
            view = first.get(f"/v1/runs/{run}/prompts/prompt-{p}")
            fitted = [g for name, g in view["groups"].items() if run == "capped" or name != "correct"]
            assert fitted and all(g["fitted"] == g["vectors"] > 0 for g in fitted), (run, p)
            for deployment in others:
                assert deployment.get(f"/v1/runs/{run}/prompts/prompt-{p}") == view, (deployment.name, run, p)
    listing = [(r["run"], r["config"]) for r in first.get("/v1/runs")["runs"]]
    assert [name for name, _ in listing] == sorted(RUNS)
    for deployment in deployments:
        assert [(r["run"], r["config"]) for r in deployment.get("/v1/runs")["runs"]] == listing, deployment.name
        for run in RUNS:
            assert deployment.replicas[0].delete(f"/v1/runs/{run}").status_code == 204, deployment.name
            assert deployment.replicas[-1].get(f"/v1/runs/{run}").status_code == 404, deployment.name
        assert deployment.get("/v1/runs")["runs"] == [], deployment.name
