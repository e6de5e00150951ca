"""Service logs in process: formats, the access line, 4xx reasons rate-limited, 5xx tracebacks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from meds_service import logs
from meds_service.app import create_app
from meds_service.settings import Settings

SECRET_TEXT = "the-prompt-text-must-never-be-logged"


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(refit_processes=False)), raise_server_exceptions=False) as c:
        yield c


def _records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


def _rendered(formatter: logging.Formatter, caplog: pytest.LogCaptureFixture) -> str:
    """The service's own lines (the test client's httpx logs its URLs)."""
    return "\n".join(formatter.format(r) for r in caplog.records if r.name.startswith(("meds", "uvicorn")))


def test_access_line_per_request_with_route_template_and_rollouts(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fingerprint = [1.2345678, 2.3456789, 3.4567891]
    body = {"rollouts": [{"rollout_id": "r0", "prompt_id": SECRET_TEXT, "correct": False,
                          "fingerprint": fingerprint}]}  # fmt: skip
    response = client.post("/v1/runs/demo/score", json=body, headers={"x-request-id": "trainer-7"})
    assert response.status_code == 200
    [line] = [r for r in _records(caplog, "meds.access") if r.fields["route"] == "/v1/runs/{run}/score"]  # type: ignore[attr-defined]
    fields: dict[str, Any] = line.fields  # type: ignore[attr-defined]
    assert line.levelno == logging.INFO
    assert fields["method"] == "POST" and fields["status"] == 200 and fields["rollouts"] == 1
    assert fields["request_id"] == "trainer-7" and fields["duration_ms"] > 0
    rendered = _rendered(logs.JsonFormatter(), caplog) + _rendered(logs.TextFormatter(), caplog)
    assert SECRET_TEXT not in rendered and "1.2345678" not in rendered and "/v1/runs/demo" not in rendered


def test_every_line_is_one_json_object(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client.get("/v1/runs/missing")
    lines = _rendered(logs.JsonFormatter(), caplog).splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(entry)
    access = [json.loads(line) for line in lines if json.loads(line)["logger"] == "meds.access"]
    assert access[-1]["status"] == 404 and access[-1]["error"] == "not_found"


def test_each_4xx_says_why_at_most_once_per_second_per_cause(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(5):
        assert client.post("/v1/runs/demo/score", json={"rollouts": []}).status_code == 422
    assert client.get("/v1/runs/missing").status_code == 404
    reasons = _records(caplog, "meds.rejected")
    assert [r.getMessage() for r in reasons] == [
        "POST /v1/runs/{run}/score 422 invalid_input: rollouts: List should have at least 1 item after validation, "
        "not 0",
        "GET /v1/runs/{run} 404 not_found: run 'missing' does not exist",
    ]
    assert all(r.levelno == logging.WARNING for r in reasons)
    assert len([r for r in _records(caplog, "meds.access") if r.fields["status"] == 422]) == 5  # type: ignore[attr-defined]


def test_rate_limit_reports_what_it_held_back() -> None:
    limiter = logs.RateLimited(interval_s=0.05)
    assert limiter.allow(("a",)) == 0
    assert limiter.allow(("a",)) is None and limiter.allow(("a",)) is None
    assert limiter.allow(("b",)) == 0  # another cause is not held back
    import time

    time.sleep(0.06)
    assert limiter.allow(("a",)) == 2


def test_a_5xx_is_logged_with_its_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client.app.state.engine, "run_names", broken)  # type: ignore[attr-defined]
    response = client.get("/v1/runs")
    assert response.status_code == 500
    with_traceback = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    assert with_traceback, "the 500 was not logged with a traceback"
    text = logs.JsonFormatter().format(with_traceback[0])
    assert "Traceback" in json.loads(text)["exc"] and "disk on fire" in json.loads(text)["exc"]
    [access] = [r for r in _records(caplog, "meds.access") if r.fields["route"] == "/v1/runs"]  # type: ignore[attr-defined]
    assert access.fields["status"] == 500  # type: ignore[attr-defined]


def test_probes_are_quiet_at_info(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client.get("/healthz")
    [probe] = [r for r in _records(caplog, "meds.access") if r.fields["route"] == "/healthz"]  # type: ignore[attr-defined]
    assert probe.levelno == logging.DEBUG


def test_configure_routes_uvicorn_and_quiets_library_loaders(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.setLevel(logging.WARNING)  # as an earlier uvicorn.Config(log_level="warning") leaves it
    try:
        logs.configure("info", "json")
        logging.getLogger("uvicorn.error").info("Started server process [1]")
        logging.getLogger("faiss.loader").info("Could not load library with AVX512 support")
        logging.getLogger("faiss.loader").warning("a real faiss problem")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [(e["logger"], e["level"]) for e in lines] == [("uvicorn.error", "info"), ("faiss.loader", "warning")]
        logs.configure("info", "text")
        logging.getLogger("meds.access").info("GET /healthz 200", extra={"fields": {"status": 200}})
        assert capsys.readouterr().err.rstrip().endswith("INFO meds.access: GET /healthz 200 status=200")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        uvicorn_error.setLevel(logging.NOTSET)


def test_docs_assets_are_logged_by_their_mount(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert client.get("/static/redoc/LICENSE").status_code == 200
    assert client.get("/no-such-route").status_code == 404
    routes = [r.fields["route"] for r in _records(caplog, "meds.access")]  # type: ignore[attr-defined]
    assert routes == ["/static/{path}", "unmatched"]


def test_a_5xx_traceback_is_logged_once_by_a_real_server(
    start_server: Callable[..., str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through uvicorn, not the test client: the server must not log the same error a second time."""
    from meds_service.engine import ErrorMemory

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")

    base = start_server(refit_processes=False)
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(ErrorMemory, "run_names", broken)
    with httpx.Client(base_url=base) as http:
        response = http.get("/v1/runs")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "internal"
        assert http.get("/healthz").status_code == 200  # the same keep-alive connection still answers
    tracebacks = [r for r in caplog.records if r.exc_info and "disk on fire" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [f"{r.name}: {r.getMessage()}" for r in tracebacks]
