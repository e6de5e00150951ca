"""The HTTP layer in process: shapes, errors (never a 5xx for bad input), auth, limits, metrics."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from meds_service.api.errors import json_object
from meds_service.app import create_app
from meds_service.core.errors import InvalidInput
from meds_service.settings import Settings


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(refit_processes=False, max_body_bytes=200_000))) as c:
        yield c


def rollout(i: int, fp: Any = (1.0, 2.0, 3.0), **extra: Any) -> dict[str, Any]:
    item = {"rollout_id": f"r{i}", "prompt_id": "p", "correct": False, "fingerprint": list(fp) if fp else fp}
    item.update(extra)
    return item


def assert_error(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "request_id"}
    assert body["error"]["type"] == type_
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert body["error"]["message"]
    return body["error"]


def test_score_answers_in_order_with_every_field(client: TestClient) -> None:
    body = {
        "step": 1,
        "rollouts": [rollout(0, reward=0.0), rollout(1, fp=None, reward=1.0), rollout(2, correct=None)],
    }
    response = client.post("/v1/runs/demo/score", json=body)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["rollout_id"] for r in results] == ["r0", "r1", "r2"]
    assert all(
        set(r) == {"rollout_id", "status", "cluster", "cluster_size", "penalty", "shaped_reward"} for r in results
    )
    assert [r["status"] for r in results] == ["scored", "skipped", "scored"]
    assert results[1]["shaped_reward"] == 1.0 and results[2]["shaped_reward"] is None


def test_binary_fingerprint_matrix_equals_json_lists(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    fps = rng.standard_normal((12, 5)).astype(np.float32)
    as_lists = {"rollouts": [rollout(i, fp=fps[i].tolist()) for i in range(12)]}
    as_matrix = {
        "rollouts": [{**rollout(i, fp=None), "fingerprint_row": i} for i in range(12)],
        "fingerprint_matrix": {
            "dtype": "float32",
            "shape": [12, 5],
            "data": base64.b64encode(fps.tobytes()).decode(),
        },
    }
    for run, body in (("lists", as_lists), ("matrix", as_matrix)):
        assert client.post(f"/v1/runs/{run}/score", json=body).status_code == 200
    for i in range(3):  # later steps see the memory: the two runs must agree exactly
        step_lists = {"rollouts": [rollout(100 + i * 12 + j, fp=fps[j].tolist()) for j in range(12)]}
        step_matrix = {
            **as_matrix,
            "rollouts": [{**rollout(100 + i * 12 + j, fp=None), "fingerprint_row": j} for j in range(12)],
        }
        a = client.post("/v1/runs/lists/score", json=step_lists).json()
        b = client.post("/v1/runs/matrix/score", json=step_matrix).json()
        assert a == b


def test_float32_values_in_their_shortest_decimal_form_are_taken(client: TestClient) -> None:
    """Clients write float32 fingerprints in the fewest digits that read back as the same float32. For the
    largest float32 that is 3.4028235e38, a little above it as a float64: still the largest float32."""
    body = b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint": [3.4028235e38, -3.4028235e38, 0.1]}]}'
    response = client.post("/v1/runs/edge/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    above = b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint": [3.4028236e38, 1.0, 0.1]}]}'
    response = client.post("/v1/runs/edge/score", content=above, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "3.4028235e+38" in response.json()["error"]["message"]


BAD_BODIES: list[tuple[str, Any, int]] = [
    ("nan", '{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint": [NaN, 1.0]}]}', 422),
    ("inf", '{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint": [Infinity, 1.0]}]}', 422),
    ("1e400", '{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint": [1e400, 1.0]}]}', 422),
    ("1e39", {"rollouts": [rollout(0, fp=[1e39, 1.0, 2.0])]}, 400),
    ("-1e39", {"rollouts": [rollout(0, fp=[-1e39, 1.0, 2.0])]}, 400),
    ("empty batch", {"rollouts": []}, 422),  # the schema states minItems 1
    ("duplicate ids", {"rollouts": [rollout(0), rollout(0)]}, 400),
    ("missing prompt_id", {"rollouts": [{"rollout_id": "a", "fingerprint": [1.0]}]}, 422),
    ("missing rollouts", {"step": 1}, 422),
    ("step past int64", {"step": 2**63, "rollouts": [rollout(0)]}, 422),  # was a 500: the store cannot hold it
    ("negative step", {"step": -1, "rollouts": [rollout(0)]}, 422),
    ("string number", {"rollouts": [rollout(0, fp=["1.0", 2.0, 3.0])]}, 422),
    ("string reward", {"rollouts": [rollout(0, reward="1")]}, 422),
    ("string correct", {"rollouts": [rollout(0, correct="false")]}, 422),
    ("not an object", [1, 2, 3], 422),
    ("a string", "hello", 422),
    ("not json", b"{not json", 400),
    ("ragged dims", {"rollouts": [rollout(0), rollout(1, fp=[1.0, 2.0])]}, 400),
    ("empty fingerprint", {"rollouts": [rollout(0, fp=[])]}, 400),
    ("unknown field", {"rollouts": [rollout(0, colour="red")]}, 422),
    ("empty id", {"rollouts": [rollout(0, rollout_id="")]}, 422),
    ("long id", {"rollouts": [rollout(0, prompt_id="x" * 513)]}, 422),
    ("row without matrix", {"rollouts": [{**rollout(0, fp=None), "fingerprint_row": 0}]}, 400),
    (
        "both fingerprints",
        {
            "rollouts": [{**rollout(0), "fingerprint_row": 0}],
            "fingerprint_matrix": {"shape": [1, 3], "data": base64.b64encode(b"\0" * 12).decode()},
        },
        400,
    ),
    (
        "bad base64",
        {
            "rollouts": [{**rollout(0, fp=None), "fingerprint_row": 0}],
            "fingerprint_matrix": {"shape": [1, 3], "data": "***"},
        },
        400,
    ),
    (
        "short matrix",
        {
            "rollouts": [{**rollout(0, fp=None), "fingerprint_row": 0}],
            "fingerprint_matrix": {"shape": [1, 3], "data": base64.b64encode(b"\0" * 8).decode()},
        },
        400,
    ),
    (
        "nan matrix",
        {
            "rollouts": [{**rollout(0, fp=None), "fingerprint_row": 0}],
            "fingerprint_matrix": {
                "shape": [1, 1],
                "data": base64.b64encode(np.float32([np.nan]).tobytes()).decode(),
            },
        },
        400,
    ),
    (
        "row out of range",
        {
            "rollouts": [{**rollout(0, fp=None), "fingerprint_row": 1}],
            "fingerprint_matrix": {"shape": [1, 1], "data": base64.b64encode(b"\0" * 4).decode()},
        },
        400,
    ),
    ("negative row", {"rollouts": [{**rollout(0, fp=None), "fingerprint_row": -1}]}, 422),
    (
        "float64 matrix",
        {"rollouts": [rollout(0)], "fingerprint_matrix": {"dtype": "float64", "shape": [0, 3], "data": ""}},
        422,
    ),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_and_stores_nothing(client: TestClient, name: str, body: Any, status: int) -> None:
    assert client.post("/v1/runs/bad/score", json={"rollouts": [rollout(99)]}).status_code == 200
    before = client.get("/v1/runs/bad").json()["stats"]
    if isinstance(body, (bytes, str)) and name != "a string":
        response = client.post("/v1/runs/bad/score", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/runs/bad/score", json=body)
    assert_error(response, status, "invalid_input")
    assert client.get("/v1/runs/bad").json()["stats"] == before


def test_wrong_dimension_for_the_run_is_400(client: TestClient) -> None:
    assert client.post("/v1/runs/d/score", json={"rollouts": [rollout(0)]}).status_code == 200
    error = assert_error(
        client.post("/v1/runs/d/score", json={"rollouts": [rollout(1, fp=[1.0, 2.0])]}), 400, "invalid_input"
    )
    assert "expects 3" in error["message"]


def test_oversized_batch_and_dim(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(refit_processes=False, max_batch=2, max_dim=2))) as c:
        assert_error(
            c.post("/v1/runs/a/score", json={"rollouts": [rollout(i, fp=[1.0]) for i in range(3)]}),
            400,
            "invalid_input",
        )
        assert_error(c.post("/v1/runs/a/score", json={"rollouts": [rollout(0)]}), 400, "invalid_input")


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    big = {"rollouts": [rollout(i, fp=[1.0] * 50) for i in range(1000)]}
    assert_error(client.post("/v1/runs/big/score", json=big), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"rollouts": ['
        for i in range(5000):
            yield (b"," if i else b"") + b'{"rollout_id": "r%d", "prompt_id": "p", "fingerprint": [1.0, 2.0]}' % i
        yield b"]}"

    assert_error(client.post("/v1/runs/big/score", content=chunks()), 413, "payload_too_large")
    assert client.get("/v1/runs/big").status_code == 404


def test_runs_crud_config_conflict_and_404s(client: TestClient) -> None:
    created = client.put("/v1/runs/r1", json={"alpha": 0.2, "penalty_target": "both"})
    assert created.status_code == 201 and created.json()["config"]["alpha"] == 0.2
    assert client.put("/v1/runs/r1", json={"knn_k": 5}).status_code == 200  # no memory yet: any change
    assert client.post("/v1/runs/r1/score", json={"rollouts": [rollout(0)]}).status_code == 200
    assert_error(client.put("/v1/runs/r1", json={"knn_k": 3}), 409, "conflict")
    assert client.put("/v1/runs/r1", json={"beta": 0.3}).json()["config"]["beta"] == 0.3
    assert_error(client.put("/v1/runs/r1", json={"alpha": -1}), 400, "invalid_input")
    assert_error(client.put("/v1/runs/r1", json={"colour": 1}), 400, "invalid_input")
    assert_error(client.put("/v1/runs/r1", json=[1]), 422, "invalid_input")
    assert_error(
        client.put("/v1/runs/r1", content=b"{", headers={"content-type": "application/json"}),
        400,
        "invalid_input",
    )
    assert [r["run"] for r in client.get("/v1/runs").json()["runs"]] == ["r1"]
    run = client.get("/v1/runs/r1").json()
    assert run["stats"]["keys"] == 1 and run["stats"]["vectors"] == 1 and run["stats"]["pending_refits"] in (0, 1)
    assert client.delete("/v1/runs/r1").status_code == 204
    for response in (
        client.get("/v1/runs/r1"),
        client.delete("/v1/runs/r1"),
        client.get("/v1/runs/r1/prompts/p"),
        client.post("/v1/runs/r1/recluster"),
    ):
        assert_error(response, 404, "not_found")
    assert_error(client.get("/v1/runs/bad name!"), 422, "invalid_input")
    assert_error(client.get("/v1/nowhere"), 404, "not_found")
    assert_error(client.patch("/v1/runs/r1"), 405, "method_not_allowed")


def test_recluster_and_prompt_view(client: TestClient) -> None:
    rng = np.random.default_rng(1)
    body = {"rollouts": [rollout(i, fp=rng.standard_normal(3).tolist()) for i in range(10)]}
    client.post("/v1/runs/rc/score", json=body)
    report = client.post("/v1/runs/rc/recluster", json={"all": True}).json()
    assert report["run"] == "rc" and report["refitted_keys"] == 1 and report["vectors"] == 10
    assert client.post("/v1/runs/rc/recluster").json()["refitted_keys"] == 0
    assert_error(client.post("/v1/runs/rc/recluster", json={"all": "yes"}), 422, "invalid_input")
    view = client.get("/v1/runs/rc/prompts/p").json()
    assert view["prompt_id"] == "p" and list(view["groups"]) == ["wrong"]
    group = view["groups"]["wrong"]
    assert group["vectors"] == group["fitted"] == 10 and not group["pending_refit"] and len(group["labels"]) == 10


def test_auth(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(refit_processes=False, api_keys="k1,k2"))) as c:
        assert_error(c.get("/v1/runs"), 401, "unauthorized")
        assert_error(c.get("/v1/runs", headers={"authorization": "Bearer nope"}), 401, "unauthorized")
        assert_error(c.get("/v1/runs", headers={"authorization": "Basic k1"}), 401, "unauthorized")
        assert c.get("/v1/runs", headers={"authorization": "Bearer k2"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200


def test_production_refuses_to_start_without_keys(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="MEDS_API_KEYS"):
        make_settings(env="production")


def test_health_ready_docs_and_request_ids(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "detail": {"store": "sqlite", "runs": 0}}
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "ScoreRequest" in schema["components"]["schemas"] and "RolloutIn" in schema["components"]["schemas"]
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz", headers={"x-request-id": "bad id!"}).headers["x-request-id"]) == 32


def test_metrics_are_exported(client: TestClient) -> None:
    client.post("/v1/runs/m/score", json={"rollouts": [rollout(0), rollout(1, fp=None)]})
    client.post("/v1/runs/m/score", json={"rollouts": [rollout(0)]})
    client.post("/v1/runs/m/score", json={"rollouts": [rollout(2), rollout(2)]})  # repeated ids: 400
    client.post("/v1/runs/m/recluster")
    text = client.get("/metrics").text
    for needle in (
        'meds_http_requests_total{method="POST",route="/v1/runs/{run}/score",status="200"} 2.0',
        'meds_http_requests_total{method="POST",route="/v1/runs/{run}/score",status="400"} 1.0',
        "meds_http_request_duration_seconds_bucket",
        'meds_rollouts_total{status="scored"} 1.0',
        'meds_rollouts_total{status="skipped"} 1.0',
        'meds_rollouts_total{status="duplicate"} 1.0',
        'meds_penalty_bucket{le="+Inf"} 1.0',
        "meds_keys 1.0",
        "meds_vectors 1.0",
        "meds_pending_refits",
        "meds_refit_duration_seconds_bucket",
        "meds_refit_keys_total",
    ):
        assert needle in text, needle


def columns(rollouts: list[dict[str, Any]], **extra: Any) -> bytes:
    """The msgpack columnar form of JSON rollouts (all with fingerprints of one dimension, or none)."""
    fps = [r.get("fingerprint") for r in rollouts]
    present = np.array([fp is not None for fp in fps], dtype=np.uint8)
    matrix = np.array([fp for fp in fps if fp is not None], dtype="<f4")
    body: dict[str, Any] = {
        "rollout_id": [r["rollout_id"] for r in rollouts],
        "prompt_id": [r["prompt_id"] for r in rollouts],
        "correct": np.array([-1 if r.get("correct") is None else int(r["correct"]) for r in rollouts], "<i1").tobytes(),
        "reward": np.array([np.nan if r.get("reward") is None else r["reward"] for r in rollouts], "<f8").tobytes(),
        "fingerprint_present": present.tobytes(),
        "fingerprints": {"dtype": "float32", "shape": list(matrix.shape), "data": matrix.tobytes()},
    }
    body.update(extra)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...})


def unpack_results(content: bytes) -> list[dict[str, Any]]:
    wire = msgpack.unpackb(content)
    names = ["scored", "skipped", "duplicate"]
    cluster = np.frombuffer(wire["cluster"], "<i4")
    shaped = np.frombuffer(wire["shaped_reward"], "<f8")
    return [
        {"rollout_id": rid, "status": names[s], "cluster": None if c == np.iinfo(np.int32).min else int(c),
         "cluster_size": int(z), "penalty": float(p), "shaped_reward": None if np.isnan(sh) else float(sh)}
        for rid, s, c, z, p, sh in zip(wire["rollout_id"], np.frombuffer(wire["status"], "<i1"), cluster,
                                       np.frombuffer(wire["cluster_size"], "<i4"),
                                       np.frombuffer(wire["penalty"], "<f8"), shaped, strict=True)
    ]  # fmt: skip


def test_columnar_msgpack_equals_json(client: TestClient) -> None:
    rng = np.random.default_rng(4)
    mp = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    for step in range(4):
        rollouts = [rollout(step * 20 + i, fp=rng.standard_normal(6).astype(np.float32).tolist(), reward=1.0)
                    for i in range(18)]  # fmt: skip
        rollouts += [rollout(step * 20 + 18, fp=None, reward=0.5), rollout(step * 20 + 19, correct=None, fp=[1.0] * 6)]
        as_json = client.post("/v1/runs/json/score", json={"rollouts": rollouts}).json()["results"]
        response = client.post("/v1/runs/columns/score", content=columns(rollouts), headers=mp)
        assert response.status_code == 200 and response.headers["content-type"] == "application/msgpack"
        assert unpack_results(response.content) == as_json
    # A msgpack request may take a JSON answer, and a retry is a duplicate either way.
    again = client.post(
        "/v1/runs/columns/score", content=columns(rollouts), headers={"content-type": "application/msgpack"}
    )
    assert {r["status"] for r in again.json()["results"]} == {"duplicate", "skipped"}


BAD_COLUMNS: list[tuple[str, bytes, int]] = [
    ("not msgpack", b"\xc1\xc1", 400),
    ("step past int64", columns([rollout(0)], step=2**63), 422),
    ("not a map", msgpack.packb([1, 2]), 422),
    ("unknown field", columns([rollout(0)], colour=1), 422),
    ("ids not a list", msgpack.packb({"rollout_id": "a", "prompt_id": ["p"]}), 422),
    ("empty", msgpack.packb({"rollout_id": [], "prompt_id": []}), 422),
    ("lengths differ", msgpack.packb({"rollout_id": ["a", "b"], "prompt_id": ["p"]}), 422),
    ("duplicate ids", msgpack.packb({"rollout_id": ["a", "a"], "prompt_id": ["p", "p"]}), 400),
    ("short correct", msgpack.packb({"rollout_id": ["a"], "prompt_id": ["p"], "correct": b""}), 422),
    ("bad correct", msgpack.packb({"rollout_id": ["a"], "prompt_id": ["p"], "correct": b"\x05"}), 422),
    (
        "inf reward",
        msgpack.packb({"rollout_id": ["a"], "prompt_id": ["p"], "reward": np.array([np.inf]).tobytes()}),
        400,
    ),
    ("nan fingerprint", columns([rollout(0, fp=[float("nan"), 1.0, 2.0])]), 400),
    ("rows mismatch", columns([rollout(0), rollout(1)], fingerprint_present=b"\x01\x00"), 400),
    ("bad shape", columns([rollout(0)], fingerprints={"shape": [1], "data": b""}), 422),
    ("short data", columns([rollout(0)], fingerprints={"dtype": "float32", "shape": [1, 3], "data": b"\x00" * 8}), 400),
    ("float64", columns([rollout(0)], fingerprints={"dtype": "float64", "shape": [1, 3], "data": b"\x00" * 24}), 422),
    ("step string", columns([rollout(0)], step="1"), 422),
    ("long id", msgpack.packb({"rollout_id": ["x" * 513], "prompt_id": ["p"]}), 422),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_COLUMNS, ids=[b[0] for b in BAD_COLUMNS])
def test_bad_columnar_input_is_a_4xx_and_stores_nothing(
    client: TestClient, name: str, body: bytes, status: int
) -> None:
    assert client.post("/v1/runs/badc/score", json={"rollouts": [rollout(99)]}).status_code == 200
    before = client.get("/v1/runs/badc").json()["stats"]
    response = client.post("/v1/runs/badc/score", content=body, headers={"content-type": "application/msgpack"})
    assert_error(response, status, "invalid_input")
    assert client.get("/v1/runs/badc").json()["stats"] == before


@pytest.mark.parametrize(
    ("body", "repeats"),
    [
        (b'{"x": [1, {"a": 1}]}', False),  # an object after a number in a list is counted, not missed
        (b'{"x": [1, {"a": 1, "a": 2}]}', True),
        (b'{"x": "a: b", "y": {"k": ":"}}', False),  # colons inside strings: the exact pass over strings
        (b'{"x": "a: b", "y": {"k": 1, "k": 2}}', True),
        (b'{"x": [[{"a": 1}], [{"a": 1, "b": {"c": [], "c": []}}]]}', True),
        (b'{"x": [[{"a": 1}], [{"a": 1, "b": {"c": [], "d": {}}}]]}', False),
    ],
)
def test_repeated_keys_are_found_at_any_depth_and_only_then(body: bytes, repeats: bool) -> None:
    if repeats:
        with pytest.raises(InvalidInput, match="repeats a key"):
            json_object(body)
    else:
        assert json_object(body)
