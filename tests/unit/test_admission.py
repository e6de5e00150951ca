"""Admission of score requests: bounds per run and in all, refusals with Retry-After, slots given back."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from meds_service.api.admission import MIN_RETRY_AFTER_S, Admission
from meds_service.app import create_app
from meds_service.settings import Settings

BODY = {"rollouts": [{"rollout_id": "r0", "prompt_id": "p", "correct": False, "fingerprint": [1.0, 2.0]}]}


def test_a_run_past_its_bound_is_refused_and_others_are_not() -> None:
    refused: list[str] = []
    admission = Admission(2, 3, on_refusal=refused.append)
    assert admission.enter("a") is None and admission.enter("a") is None
    refusal = admission.enter("a")
    assert refusal is not None and refusal.bound == "run" and refusal.limit == 2
    assert admission.enter("b") is None  # another run still has room, up to the total
    total = admission.enter("c")
    assert total is not None and total.bound == "total" and total.limit == 3
    assert refused == ["run", "total"]
    assert admission.in_flight() == 3 and admission.in_flight("a") == 2 and admission.in_flight("c") == 0


def test_a_slot_given_back_admits_the_next_request() -> None:
    changes: list[int] = []
    admission = Admission(1, 8, on_change=changes.append)
    assert admission.enter("a") is None
    assert admission.enter("a") is not None
    admission.leave("a", 0.2)
    assert admission.in_flight("a") == 0 and admission.in_flight() == 0
    assert admission.enter("a") is None
    assert changes == [1, 0, 1]


def test_retry_after_is_the_time_a_slot_takes_to_free_jittered_and_capped() -> None:
    draws = iter([0.0, 1.0, 0.5, 0.5])
    admission = Admission(2, 8, max_retry_after_s=3.0, uniform=lambda: next(draws))
    for _ in range(2):
        assert admission.enter("a") is None
    admission.leave("a", 1.0)  # the first request of the run sets the estimate: 1.0 s held
    assert admission.enter("a") is None
    low, high = admission.enter("a"), admission.enter("a")
    assert low is not None and high is not None
    assert low.retry_after_s == pytest.approx(0.5) and high.retry_after_s == pytest.approx(1.5)
    assert low.headers() == {"Retry-After": "1", "retry-after-ms": "500"}
    assert high.headers()["Retry-After"] == "2"
    for _ in range(2):
        admission.leave("a", 60.0)
    slow = Admission(1, 8, max_retry_after_s=3.0, uniform=lambda: 0.5)
    assert slow.enter("a") is None
    slow.leave("a", 60.0)
    assert slow.enter("a") is None
    capped = slow.enter("a")
    assert capped is not None and capped.retry_after_s == 3.0
    fast = Admission(1, 8, uniform=lambda: 0.0)
    assert fast.enter("a") is None
    fast.leave("a", 0.0)
    assert fast.enter("a") is None
    floor = fast.enter("a")
    assert floor is not None and floor.retry_after_s == MIN_RETRY_AFTER_S


def test_bounds_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0, 4)


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(refit_processes=False, max_inflight_per_run=1, max_inflight_total=2)
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_route_refuses_at_once_with_503_and_retry_after_before_reading_the_body(client: TestClient) -> None:
    admission: Admission = client.app.state.admission  # type: ignore[attr-defined]
    assert admission.enter("busy") is None  # a request of run "busy" in flight
    try:
        # Not even JSON: had the body been read, this would be a 400.
        response = client.post(
            "/v1/runs/busy/score", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "unavailable"
        assert "MEDS_MAX_INFLIGHT_PER_RUN" in response.json()["error"]["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert int(response.headers["retry-after-ms"]) >= 1
        assert client.post("/v1/runs/other/score", json=BODY).status_code == 200  # another run is admitted
        assert admission.enter("third") is None  # now the total bound (2) is full
        response = client.post("/v1/runs/other/score", json=BODY)
        assert response.status_code == 503 and "MEDS_MAX_INFLIGHT_TOTAL" in response.json()["error"]["message"]
        admission.leave("third", 0.0)
    finally:
        admission.leave("busy", 0.0)
    assert client.post("/v1/runs/busy/score", json=BODY).status_code == 200
    assert admission.in_flight() == 0  # every admitted request gave its slot back, errors included
    assert (
        client.post(
            "/v1/runs/busy/score", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert admission.in_flight() == 0
    metrics = client.get("/metrics").text
    assert 'meds_score_refusals_total{bound="run"} 1.0' in metrics
    assert 'meds_score_refusals_total{bound="total"} 1.0' in metrics
    assert "meds_score_in_flight 0.0" in metrics
