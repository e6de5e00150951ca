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


def test_refusals_advise_returns_one_slot_apart() -> None:
    now = [0.0]
    admission = Admission(2, 8, max_retry_after_s=3.0, uniform=lambda: 0.5, clock=lambda: now[0])
    for _ in range(2):
        assert admission.enter("a") is None
    admission.leave("a", 1.0)  # a request held its slot 1 s with 2 slots: one frees about every 0.5 s
    assert admission.enter("a") is None
    waits = [refusal.retry_after_s for refusal in (admission.enter("a") for _ in range(3)) if refusal is not None]
    assert waits == pytest.approx([0.5, 1.0, 1.5])  # each refused client a slot later than the one before
    now[0] = 1.2
    later = admission.enter("a")
    assert later is not None and later.retry_after_s == pytest.approx(0.8)  # after the last advised (1.5 s)
    assert later.headers() == {"Retry-After": "1", "retry-after-ms": "800"}
    now[0] = 10.0  # the advised returns are past: the line starts again from now
    fresh = admission.enter("a")
    assert fresh is not None and fresh.retry_after_s == pytest.approx(0.5)
    crowd = [admission.enter("a") for _ in range(10)]
    assert max(r.retry_after_s for r in crowd if r is not None) == 3.0  # capped at max_retry_after_s
    assert admission.enter("b") is None  # another run has its own slots and its own line


def test_a_freed_slot_is_kept_for_the_advised_return_due_next() -> None:
    now = [0.0]
    admission = Admission(1, 8, uniform=lambda: 0.5, clock=lambda: now[0])
    assert admission.enter("a") is None
    refused = admission.enter("a")  # told to come back in one slot time (1 s before any request finished)
    assert refused is not None and refused.retry_after_s == pytest.approx(1.0)
    now[0] = 0.6
    admission.leave("a", 0.6)  # the slot frees; now a slot takes about 0.6 s
    # The client just answered sends its next batch at once: the slot is kept for the return due at 1.0 s.
    again = admission.enter("a")
    assert again is not None and again.retry_after_s == pytest.approx(1.6 - 0.6)  # a slot after 1.0 s
    now[0] = 1.0
    assert admission.enter("a") is None  # the client told to come back at 1.0 s is admitted
    admission.leave("a", 0.6)
    now[0] = 3.0  # the return advised for 1.6 s was missed by more than a slot time: forgotten
    assert admission.enter("a") is None


def test_advised_waits_are_jittered_and_never_below_the_floor() -> None:
    draws = iter([0.0, 1.0])
    jittered = Admission(1, 8, uniform=lambda: next(draws), clock=lambda: 0.0)
    assert jittered.enter("a") is None
    first, second = jittered.enter("a"), jittered.enter("a")  # s = 1 s before any request finished
    assert first is not None and second is not None
    assert first.retry_after_s == pytest.approx(0.5) and second.retry_after_s == pytest.approx(0.5 + 1.5)
    instant = Admission(1, 8, uniform=lambda: 0.0, clock=lambda: 0.0)
    assert instant.enter("a") is None
    instant.leave("a", 0.0)
    assert instant.enter("a") is None
    floor = instant.enter("a")
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
