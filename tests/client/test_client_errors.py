"""The client's error taxonomy follows the service's error types: one class per meaning."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from meds_client import ConflictError, IdCollisionError, Rollout
from tests.client._fakes import FakeService


def typed_error(status: int, error_type: str) -> httpx.Response:
    body = {"error": {"type": error_type, "message": "failed", "request_id": "req-1"}}
    return httpx.Response(status, json=body)


def one_rollout() -> list[Rollout]:
    return [Rollout("r0", "p0", correct=False, fingerprint=np.ones(4, dtype=np.float32))]


def test_a_hash_collision_is_not_a_conflict(service: FakeService, make_client: Any) -> None:
    service.script = [typed_error(409, "id_collision")]
    with pytest.raises(IdCollisionError) as caught:
        make_client().score("run-1", one_rollout())
    assert not isinstance(caught.value, ConflictError) and caught.value.error_type == "id_collision"


def test_a_hash_collision_degrades_under_on_error_zero(service: FakeService, make_client: Any) -> None:
    service.script = [typed_error(409, "id_collision")]
    results = make_client(on_error="zero").score("run-1", one_rollout())
    assert [r.status for r in results] == ["error"] and results[0].penalty == 0.0


def test_a_config_conflict_still_raises_under_on_error_zero(service: FakeService, make_client: Any) -> None:
    service.script = [typed_error(409, "conflict")]
    with pytest.raises(ConflictError):
        make_client(on_error="zero").score("run-1", one_rollout())
