"""The trainer-independent parts of the integrations, and the TRL reward functions, on a fake service."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest

from meds_client import AsyncMedsClient, MedsClient, prompt_id
from meds_client.integrations import MedsShaper, Shaping, correctness_from_scores, shape_rewards
from meds_client.integrations.trl import FINGERPRINT_COLUMN, AsyncMedsPenaltyReward, MedsPenaltyReward
from tests.client._fakes import FAST_RETRIES, FakeService

VECTOR = np.ones(3, dtype=np.float32)


def client_for(service: FakeService, **options: Any) -> MedsClient:
    transport = httpx.MockTransport(service)
    return MedsClient(
        "http://meds.test", http_client=httpx.Client(transport=transport), retries=FAST_RETRIES, **options
    )


def test_shape_rewards_follows_the_reference_formulas() -> None:
    shaped = shape_rewards([0.0, 1.0, 1.0, -1.0], [False, True, None, False], [0.2, 0.1, 0.5, 0.0693])
    np.testing.assert_allclose(shaped, [-0.2, 1.0 / 1.1, 1.0, -1.0693])


def test_correctness_from_scores() -> None:
    assert correctness_from_scores([0.0, 0.5, 1.0, None, float("nan"), -1.0]) == [False, True, True, None, None, False]
    assert correctness_from_scores([0.7], threshold=0.8) == [False]


def test_metrics_have_fixed_keys_even_for_an_empty_batch() -> None:
    empty = Shaping.from_results([], []).metrics()
    full = Shaping(np.array([0.0, 0.2]), np.array([0, 7]), ["skipped", "scored"], [False, False]).metrics()
    assert empty.keys() == full.keys()
    assert full["meds/penalty_mean"] == pytest.approx(0.1) and full["meds/penalized_frac"] == 0.5
    assert full["meds/skipped_frac"] == 0.5 and full["meds/error_frac"] == 0.0


def test_shaper_makes_unique_rollout_ids_and_checks_lengths() -> None:
    service = FakeService()
    shaper = MedsShaper(client_for(service), "run-1", prompt_id_fn=str.upper)
    shaper.score(prompt_ids=shaper.prompt_ids(["a", "b"]), correct=[False, None], fingerprints=[VECTOR, None])
    shaper.score(prompt_ids=["A"], correct=[False], fingerprints=[VECTOR])
    ids = [r["rollout_id"] for body in service.bodies() for r in body["rollouts"]]
    assert len(set(ids)) == 3 and [r["prompt_id"] for r in service.bodies()[0]["rollouts"]] == ["A", "B"]
    with pytest.raises(ValueError, match="one entry per rollout"):
        shaper.score(prompt_ids=["a"], correct=[], fingerprints=[])


def accuracy(completions: list[str], **_: Any) -> list[float]:
    return [1.0 if "right" in c else 0.0 for c in completions]


def trl_inputs(**extra: Any) -> dict[str, Any]:
    return {
        "prompts": [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]] * 3,
        "completions": ["right", "wrong", "wrong"],
        "completion_ids": [[1], [2], [3]],
        FINGERPRINT_COLUMN: [VECTOR, VECTOR, None],
        **extra,
    }


def test_trl_reward_returns_the_change_to_the_accuracy_reward() -> None:
    service = FakeService()
    logged: dict[str, float] = {}
    reward = MedsPenaltyReward(client_for(service), "run-1", accuracy=accuracy)
    values = reward(**trl_inputs(log_metric=logged.__setitem__))
    assert values == [0.0, pytest.approx(-0.1), 0.0]  # the fake penalises wrong rollouts with a fingerprint
    sent = service.bodies()[0]["rollouts"]
    assert [r["prompt_id"] for r in sent] == [prompt_id("Q?")] * 3  # conversational: the last user message
    assert [r["correct"] for r in sent] == [True, False, False]
    assert logged["meds/penalized_frac"] == pytest.approx(1 / 3)
    assert reward.__name__ == "meds_penalty"


def test_trl_reward_prefers_the_prompt_id_column_and_sends_the_step() -> None:
    class State:
        global_step = 12

    service = FakeService()
    MedsPenaltyReward(client_for(service), "run-1", accuracy=accuracy)(
        **trl_inputs(prompt_id=["k1", "k1", "k2"], trainer_state=State())
    )
    body = service.bodies()[0]
    assert body["step"] == 12 and [r["prompt_id"] for r in body["rollouts"]] == ["k1", "k1", "k2"]
    assert all(r["rollout_id"].startswith("trl-s12-") for r in body["rollouts"])


def test_trl_reward_gives_none_when_the_service_is_down() -> None:
    service = FakeService()
    service.script = [httpx.ConnectError("down")] * 4
    reward = MedsPenaltyReward(client_for(service, on_error="zero"), "run-1", accuracy=accuracy)
    assert reward(**trl_inputs()) == [None, None, None]


def test_trl_reward_needs_fingerprints() -> None:
    inputs = trl_inputs()
    del inputs[FINGERPRINT_COLUMN]
    with pytest.raises(KeyError, match="MedsGRPOTrainer"):
        MedsPenaltyReward(client_for(FakeService()), "run-1", accuracy=accuracy)(**inputs)


def test_async_trl_reward_matches_the_sync_one() -> None:
    service = FakeService()
    client = AsyncMedsClient("http://meds.test", http_client=httpx.AsyncClient(transport=httpx.MockTransport(service)))
    reward = AsyncMedsPenaltyReward(client, "run-1", accuracy=accuracy)
    assert asyncio.iscoroutinefunction(reward.__call__)
    values = asyncio.run(reward(**trl_inputs(prompts=["plain text prompt"] * 3)))
    assert values == [0.0, pytest.approx(-0.1), 0.0]
    assert service.bodies()[0]["rollouts"][0]["prompt_id"] == prompt_id("plain text prompt")
