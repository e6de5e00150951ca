"""The contract is strict: unknown media types, repeated JSON keys and msgpack flags other than 0 and 1 are
refused and store nothing; OPTIONS and 405 name every method of a path; a rollout is identified by
(prompt_id, rollout_id) within its run."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgpack
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from meds_service.app import create_app
from meds_service.settings import Settings
from tests.unit.test_api import assert_error, rollout


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(refit_processes=False))) as c:
        yield c


def stored(client: TestClient, run: str) -> int:
    response = client.get(f"/v1/runs/{run}")
    return int(response.json()["stats"]["rollouts"]) if response.status_code == 200 else 0


BODY = orjson.dumps({"rollouts": [rollout(0)]})


@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain"}, {"content-type": "application/xml"}])
def test_unknown_media_types_are_415_and_store_nothing(client: TestClient, headers: dict[str, str]) -> None:
    client.headers.pop("content-type", None)
    response = client.post("/v1/runs/m/score", content=BODY, headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert_error(client.put("/v1/runs/m", content=b'{"beta": 0.3}', headers=headers), 415, "unsupported_media_type")
    assert_error(client.post("/v1/runs/m/recluster", content=b"{}", headers=headers), 415, "unsupported_media_type")
    assert stored(client, "m") == 0
    response = client.post(
        "/v1/runs/m/score", content=BODY, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200 and stored(client, "m") == 1


def test_empty_bodies_need_no_content_type(client: TestClient) -> None:
    assert client.put("/v1/runs/e").status_code == 201
    assert client.post("/v1/runs/e/recluster").status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/runs/d/score", b'{"rollouts": [], "rollouts": [%s]}' % orjson.dumps(rollout(0))),
        ("/v1/runs/d/score", b'{"rollouts": [{"rollout_id": "a", "rollout_id": "b", "prompt_id": "p"}]}'),
        (
            "/v1/runs/d/score",
            b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "correct": true, "correct": false}]}',
        ),
        ("/v1/runs/d/score", b'{"step": 1, "rollouts": [{"rollout_id": "a", "prompt_id": "p"}], "st\\u0065p": 2}'),
        ("/v1/runs/d", b'{"beta": 0.1, "beta": 0.5}'),
        ("/v1/runs/d/recluster", b'{"all": false, "all": true}'),
    ],
)
def test_repeated_json_keys_are_400(client: TestClient, path: str, body: bytes) -> None:
    method = client.put if path == "/v1/runs/d" else client.post
    error = assert_error(method(path, content=body, headers={"content-type": "application/json"}), 400, "invalid_input")
    assert "repeats a key" in error["message"]
    assert stored(client, "d") == 0


def test_keys_inside_strings_are_not_keys(client: TestClient) -> None:
    """Text that looks like JSON keys, escapes and colons included, is a value, not a repeat."""
    text = 'say "rollout_id": "x", \\"prompt_id\\": 1 } { "a": "b":'
    body = orjson.dumps({"rollouts": [rollout(0, text=text), rollout(1, text=":" + text)], "step": 3})
    response = client.post("/v1/runs/t/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_msgpack_presence_flags_are_0_or_1(client: TestClient) -> None:
    matrix = np.ones((1, 3), dtype="<f4")
    body = {
        "rollout_id": ["a", "b"],
        "prompt_id": ["p", "p"],
        "fingerprints": {"dtype": "float32", "shape": [1, 3], "data": matrix.tobytes()},
        "fingerprint_present": bytes([0, 2]),
    }
    headers = {"content-type": "application/msgpack"}
    response = client.post("/v1/runs/b/score", content=msgpack.packb(body), headers=headers)
    assert_error(response, 422, "invalid_input")
    assert stored(client, "b") == 0
    body["fingerprint_present"] = bytes([0, 1])
    assert client.post("/v1/runs/b/score", content=msgpack.packb(body), headers=headers).status_code == 200
    assert stored(client, "b") == 1


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/runs/r", {"GET", "PUT", "DELETE", "OPTIONS"}),
        ("/v1/runs", {"GET", "OPTIONS"}),
        ("/v1/runs/r/score", {"POST", "OPTIONS"}),
        ("/healthz", {"GET", "OPTIONS"}),
    ],
)
def test_options_and_405_name_every_method(client: TestClient, path: str, methods: set[str]) -> None:
    response = client.options(path)
    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == methods
    response = client.patch(path, json={})
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == methods


def test_a_rollout_is_identified_by_prompt_and_rollout_id(client: TestClient) -> None:
    """The same rollout_id under another prompt is another rollout; under the same prompt, a retry."""
    first = client.post("/v1/runs/i/score", json={"rollouts": [rollout(0)]}).json()["results"]
    again = client.post("/v1/runs/i/score", json={"rollouts": [rollout(0)]}).json()["results"]
    other = client.post("/v1/runs/i/score", json={"rollouts": [rollout(0, prompt_id="q")]}).json()["results"]
    assert [first[0]["status"], again[0]["status"], other[0]["status"]] == ["scored", "duplicate", "scored"]
    assert stored(client, "i") == 2
    same_request = {"rollouts": [rollout(0, prompt_id="x"), rollout(0, prompt_id="y")]}
    error = assert_error(client.post("/v1/runs/i/score", json=same_request), 400, "invalid_input")
    assert "repeat within the request" in error["message"]


@pytest.mark.parametrize("row", [2**63, 2**70])
def test_a_fingerprint_row_beyond_int64_is_400_and_stores_nothing(client: TestClient, row: int) -> None:
    """It was compared after conversion to int64, which overflowed: a 500."""
    body = orjson.dumps(
        {
            "rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint_row": 0}],
            "fingerprint_matrix": {"shape": [1, 2], "data": "AACAPwAAAEA="},
        }
    ).replace(b'"fingerprint_row":0', b'"fingerprint_row":%d' % row)
    response = client.post("/v1/runs/big/score", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_input")
    assert error["message"] == f"fingerprint_row {row} is outside fingerprint_matrix"
    assert stored(client, "big") == 0
