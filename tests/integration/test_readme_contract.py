"""What the README promises, against a live service: the score example, retries, reads, last_n_layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meds_client import MedsClient


@pytest.fixture
def base(start_server: Callable[..., str]) -> str:
    return start_server(refit_processes=False, refit_workers=1)


def _score(base: str, run: str, rollouts: list[dict[str, Any]], step: int = 1) -> httpx.Response:
    return httpx.post(f"{base}/v1/runs/{run}/score", json={"step": step, "rollouts": rollouts}, timeout=30)


def _rollout(rollout_id: str, fingerprint: list[float] | None, correct: bool = False, **extra: Any) -> dict[str, Any]:
    return {"rollout_id": rollout_id, "prompt_id": "p7", "correct": correct, "fingerprint": fingerprint, **extra}


def test_the_readme_score_example_and_its_next_step(base: str) -> None:
    first = _score(base, "demo", [
        _rollout("s1-p7-r0", [1.0, 2.0, 3.0], reward=0.0),
        _rollout("s1-p7-r1", [1.0, 2.0, 3.5], reward=0.0),
        _rollout("s1-p7-r2", None, correct=True, reward=1.0),
    ])  # fmt: skip
    fresh = {"cluster": None, "cluster_size": 0, "penalty": 0.0}
    assert first.json() == {"results": [
        {"rollout_id": "s1-p7-r0", "status": "scored", **fresh, "shaped_reward": 0.0},
        {"rollout_id": "s1-p7-r1", "status": "scored", **fresh, "shaped_reward": 0.0},
        {"rollout_id": "s1-p7-r2", "status": "skipped", **fresh, "shaped_reward": 1.0},
    ], "metrics": {"repeat_rate": 0.0, "distinct_error_clusters": 0.0, "largest_cluster_share": 0.0,
                   "cluster_entropy": 0.0, "penalised_fraction": 0.0, "mean_penalty": 0.0},
       "metric_counts": {"wrong_rollouts": 2, "judged_prompts": 0, "remembered_rollouts": 2}}  # fmt: skip
    # The README: the two wrong answers are HDBSCAN noise (it never returns the whole set as one cluster).
    memory = httpx.get(f"{base}/v1/runs/demo/prompts/p7", timeout=30).json()
    assert memory["groups"]["wrong"]["labels"] == [-1, -1]
    [third] = _score(base, "demo", [_rollout("s2-p7-r0", [1.0, 2.0, 3.1], reward=0.0)], step=2).json()["results"]
    assert third == {"rollout_id": "s2-p7-r0", "status": "scored", "cluster": -1, "cluster_size": 2,
                     "penalty": 0.10986122886681099, "shaped_reward": -0.10986122886681099}  # fmt: skip
    assert third["penalty"] == pytest.approx(0.1 * math.log(3))
    run = httpx.get(f"{base}/v1/runs/demo", timeout=30).json()
    assert isinstance(run["created_at"], float) and run["created_at"] > 1.7e9  # Unix seconds


def test_a_retry_repeats_scored_results_and_judges_skipped_rollouts_again(base: str) -> None:
    batch = [_rollout("a", [1.0, 2.0, 3.0]), _rollout("b", None)]
    assert [r["status"] for r in _score(base, "retry", batch).json()["results"]] == ["scored", "skipped"]
    again = _score(base, "retry", batch).json()["results"]
    assert [r["status"] for r in again] == ["duplicate", "skipped"]  # skipped rollouts are not remembered
    with_fingerprint = _score(base, "retry", [_rollout("b", [1.0, 2.0, 3.2])]).json()["results"]
    assert [r["status"] for r in with_fingerprint] == ["scored"]


def test_last_n_layers_rejects_shorter_fingerprints_naming_both_numbers(base: str) -> None:
    assert httpx.put(f"{base}/v1/runs/deep", json={"last_n_layers": 14}, timeout=30).status_code == 201
    response = _score(base, "deep", [_rollout("a", [1.0, 2.0, 3.0])])
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "3 values" in message and "last 14" in message
    assert httpx.get(f"{base}/v1/runs/deep", timeout=30).json()["config"]["dim"] is None  # nothing was fixed
    assert httpx.put(f"{base}/v1/runs/diff", json={"last_n_layers": 14, "layer_diff": True}, timeout=30).is_success
    assert "at least 15" in _score(base, "diff", [_rollout("a", [0.5] * 14)]).json()["error"]["message"]
    assert _score(base, "diff", [_rollout("a", [0.5] * 28)]).status_code == 200  # longer ones are cut


def test_created_is_only_known_to_put_run(base: str) -> None:
    with MedsClient(base) as client:
        assert client.put_run("c", {}).created is True
        assert client.put_run("c", {"alpha": 0.15}).created is False
        assert client.get_run("c").created is None
        assert [run.created for run in client.list_runs()] == [None]
