"""The error-collapse surface over HTTP: metrics in both wire forms and the OpenAPI schema, the per-run
gauges, the summary and ranking routes (paging, bad input as 4xx), API keys, and the page's own files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from meds_service.app import create_app
from meds_service.core.collapse import COUNTS, NAMES
from meds_service.settings import Settings


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(refit_processes=False))) as c:
        yield c


def step_body(step: int, prompts: int = 4, per_prompt: int = 6) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    modes = np.random.default_rng(0).standard_normal((prompts, 3, 5)) * 3
    rollouts = []
    for p in range(prompts):
        for r in range(per_prompt):
            fp = modes[p, int(rng.integers(3))] + rng.standard_normal(5) * 0.05
            rollouts.append({"rollout_id": f"s{step}-p{p}-r{r}", "prompt_id": f"q{p}", "correct": r % 3 == 0,
                             "fingerprint": fp.tolist()})  # fmt: skip
    return {"step": step, "rollouts": rollouts}


def fill(client: TestClient, run: str, steps: int = 4) -> None:
    for step in range(steps):
        assert client.post(f"/v1/runs/{run}/score", json=step_body(step)).status_code == 200
    assert client.post(f"/v1/runs/{run}/recluster", json={"all": True}).status_code == 200


def test_both_wire_forms_carry_the_same_fixed_metrics(client: TestClient) -> None:
    for step in range(3):
        client.post("/v1/runs/w/score", json=step_body(step))
    body = step_body(7)
    as_json = client.post("/v1/runs/w/score", json=body).json()
    assert list(as_json["metrics"]) == list(NAMES) and list(as_json["metric_counts"]) == list(COUNTS)
    assert as_json["metrics"]["repeat_rate"] > 0
    retry = client.post("/v1/runs/w/score", json=body, headers={"accept": "application/msgpack"})
    columns = msgpack.unpackb(retry.content)
    assert columns["metrics"] == as_json["metrics"] and columns["metric_counts"] == as_json["metric_counts"]
    empty = client.post("/v1/runs/w2/score", json={"rollouts": [{"rollout_id": "x", "prompt_id": "p"}]}).json()
    assert empty["metrics"] == dict.fromkeys(NAMES, 0.0)  # no fingerprint: same keys, zeros


def test_the_schema_documents_the_metrics(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("ScoreResponse", "ScoreColumnsResponse"):
        assert {"metrics", "metric_counts"} <= set(schemas[model]["required"])
    assert list(schemas["BatchMetrics"]["properties"]) == list(NAMES)
    assert set(schemas["MetricCounts"]["properties"]) == set(COUNTS)


def test_gauges_per_run_only_and_gone_with_the_run(client: TestClient) -> None:
    fill(client, "g1")
    fill(client, "g2", steps=2)
    scrape = client.get("/metrics").text
    lines = [line for line in scrape.splitlines() if line.startswith("meds_collapse_")]
    assert {line.split("{")[0] for line in lines} == {f"meds_collapse_{name}" for name in NAMES}
    assert all(line.split("{")[1].split("}")[0] in ('run="g1"', 'run="g2"') for line in lines)  # no prompt label
    last = client.post("/v1/runs/g1/score", json=step_body(9)).json()["metrics"]
    scrape = client.get("/metrics").text
    assert f'meds_collapse_repeat_rate{{run="g1"}} {last["repeat_rate"]!r}' in scrape
    assert client.delete("/v1/runs/g1").status_code == 204
    assert 'run="g1"' not in client.get("/metrics").text


def test_summary_and_paged_ranking(client: TestClient) -> None:
    fill(client, "s")
    summary = client.get("/v1/runs/s/summary").json()
    assert summary["series"]["step"] == [0, 1, 2, 3]
    assert sum(summary["series"]["wrong_rollouts"]) == summary["wrong_vectors"] == 4 * 4 * 4
    first = client.get("/v1/runs/s/prompts", params={"limit": 3}).json()
    second = client.get("/v1/runs/s/prompts", params={"limit": 3, "offset": 3}).json()
    assert first["total"] == second["total"] == 4
    assert len(first["prompts"]) == 3 and len(second["prompts"]) == 1
    shares = [p["largest_cluster_share"] for p in first["prompts"] + second["prompts"]]
    assert shares == sorted(shares, reverse=True)
    by_id = client.get("/v1/runs/s/prompts", params={"sort": "prompt"}).json()["prompts"]
    assert [p["prompt_id"] for p in by_id] == ["q0", "q1", "q2", "q3"]
    view = client.get("/v1/runs/s/collapse/q1").json()
    assert view["groups"]["wrong"]["fitted"] == next(p["fitted"] for p in by_id if p["prompt_id"] == "q1")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/runs/s/prompts?sort=worst", 400),
        ("/v1/runs/s/prompts?limit=0", 422),
        ("/v1/runs/s/prompts?limit=501", 422),
        ("/v1/runs/s/prompts?offset=-1", 422),
        ("/v1/runs/nobody/summary", 404),
        ("/v1/runs/nobody/prompts", 404),
        ("/v1/runs/s/collapse/nobody", 404),
        ("/v1/runs/bad%20name/summary", 422),
    ],
)
def test_bad_requests_are_4xx(client: TestClient, path: str, status: int) -> None:
    fill(client, "s", steps=1)
    response = client.get(path)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"type", "message", "request_id"}


def test_api_keys_guard_the_data_but_not_the_page(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(refit_processes=False, api_keys=["k1"]))) as c:
        assert c.get("/v1/runs/x/summary").status_code == 401
        assert c.get("/v1/runs/x/prompts").status_code == 401
        assert c.get("/v1/runs/x/summary", headers={"authorization": "Bearer k1"}).status_code == 404
        page = c.get("/ui")
        assert page.status_code == 200 and "meds explorer" in page.text
        script = c.get("/ui/static/explorer.js")
        assert script.status_code == 200 and "Bearer" in script.text
        assert "http" not in page.text.replace("http://www.w3.org", "")  # offline: nothing fetched elsewhere


def test_texts_in_both_wire_forms_never_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    assert client.put("/v1/runs/t", json={"text_max_chars": 12}).status_code == 201
    secret = "SECRET-ANSWER-TEXT"
    caplog.set_level("DEBUG")
    for step in range(3):
        body = step_body(step)
        for item in body["rollouts"]:
            item["text"] = f"{secret} {item['rollout_id']}"
        if step == 2:  # the columnar form carries a text column
            rollouts = body["rollouts"]
            fps = np.array([r["fingerprint"] for r in rollouts], dtype="<f4")
            columns = {"step": step, "rollout_id": [r["rollout_id"] for r in rollouts],
                       "prompt_id": [r["prompt_id"] for r in rollouts],
                       "correct": np.array([int(r["correct"]) for r in rollouts], "<i1").tobytes(),
                       "fingerprints": {"dtype": "float32", "shape": list(fps.shape), "data": fps.tobytes()},
                       "text": [r["text"] for r in rollouts]}  # fmt: skip
            response = client.post("/v1/runs/t/score", content=msgpack.packb(columns),
                                   headers={"content-type": "application/msgpack"})  # fmt: skip
        else:
            response = client.post("/v1/runs/t/score", json=body)
        assert response.status_code == 200, response.text
    client.post("/v1/runs/t/recluster", json={"all": True})
    view = client.get("/v1/runs/t/collapse/q0").json()["groups"]["wrong"]
    examples = [text for cluster in view["clusters"].values() for text in cluster["examples"]]
    assert examples and {text[:12] for text in examples} == {secret[:12]} and all(len(t) == 12 for t in examples)
    assert secret[:12] not in caplog.text and secret[:12] not in client.get("/metrics").text
    bad = {"rollout_id": ["a"], "prompt_id": ["p"], "text": [1]}
    response = client.post(
        "/v1/runs/t/score", content=msgpack.packb(bad), headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 422


@pytest.mark.parametrize("value", [-1, 65537, "10", 1.5])
def test_text_limit_is_checked(client: TestClient, value: Any) -> None:
    response = client.put("/v1/runs/lim", json={"text_max_chars": value})
    assert response.status_code in (400, 422), response.text
