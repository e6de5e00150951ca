"""A stored-hash collision of two rollout ids is its own error type (409 `id_collision`), not a config
`conflict`: the real client, in degraded mode, answers it with penalty 0 instead of raising."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import numpy as np
import pytest

from meds_client import IdCollisionError, MedsClient, Rollout
from meds_service.engine import memory
from meds_service.storage import sqlite


def rollouts(ids: Sequence[str]) -> list[Rollout]:
    return [Rollout(rid, "p0", correct=False, fingerprint=np.ones(4, dtype=np.float32)) for rid in ids]


@pytest.fixture
def colliding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollout id "b" hashes like "a" (a real 64-bit collision cannot be found): where the engine hashes a
    request's ids, and where the embedded store hashes ids it was not given."""
    real = sqlite.rollout_hashes

    def hashes(prompt_ids: Sequence[str], rollout_ids: Sequence[str]) -> np.ndarray:
        return real(prompt_ids, ["a" if r == "b" else r for r in rollout_ids])

    monkeypatch.setattr(memory, "rollout_hashes", hashes)
    monkeypatch.setattr(sqlite, "rollout_hashes", hashes)


@pytest.mark.usefixtures("colliding")
def test_a_collision_is_answered_as_id_collision(meds_server: str) -> None:
    assert httpx.post(f"{meds_server}/v1/runs/r/score", json={"rollouts": [_wire("a")]}).status_code == 200
    response = httpx.post(f"{meds_server}/v1/runs/r/score", json={"rollouts": [_wire("b")]})
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "id_collision"
    with MedsClient(meds_server, on_error="raise") as client, pytest.raises(IdCollisionError):
        client.score("r", rollouts(["b"]))
    with MedsClient(meds_server, on_error="zero") as client:
        assert [r.status for r in client.score("r", rollouts(["b", "c"]))] == ["error", "error"]
        assert [r.status for r in client.score("r", rollouts(["c"]))] == ["scored"]  # nothing of it was stored


def _wire(rollout_id: str) -> dict[str, object]:
    return {"rollout_id": rollout_id, "prompt_id": "p0", "correct": False, "fingerprint": [1.0, 1.0, 1.0, 1.0]}
