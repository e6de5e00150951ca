"""Contract: every request the clients send validates against the live service's OpenAPI schema,
and every response the service gives (errors included) parses in the client and matches its schema.

Both clients run the same scenario through a recording transport against a real server."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import msgpack
import numpy as np
import pytest
from jsonschema import Draft202012Validator

from meds_client import (
    AsyncMedsClient,
    BadRequestError,
    ConflictError,
    MedsClient,
    NotFoundError,
    Rollout,
)
from tests.client._fakes import SyncView

Exchange = tuple[httpx.Request, httpx.Response]

# Answers the service gives but does not list in its schema, validated against a listed one.
FULL_CONFIG = {
    "alpha": 0.1, "beta": 0.2, "knn_k": 3, "knn_metric": "cosine", "min_cluster_size": 2, "min_samples": 1,
    "cluster_selection_method": "eom", "cluster_selection_epsilon": 0.0, "penalty_target": "wrong",
    "noise_policy": "cluster", "layer_diff": False, "last_n_layers": None, "max_memory_per_key": None,
    "consistency": "exact", "dim": 4,
}  # fmt: skip


class RecordingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        response.read()
        self.exchanges.append((request, response))
        return response


class AsyncRecordingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        await response.aread()
        self.exchanges.append((request, response))
        return response


def run_scenario(client: Any, tag: str) -> None:
    """Every call the client offers, on success and on the error paths a trainer can meet."""
    run = f"contract-{tag}"
    rng = np.random.default_rng(1)
    assert client.health()
    assert client.ready() is True
    assert client.put_run(run, FULL_CONFIG).created
    assert not client.put_run(run, {"alpha": 0.15}).created
    as_lists = [Rollout(f"{tag}-l{i}", "q 1", correct=i % 2 == 0, fingerprint=rng.normal(size=4).tolist(),
                        reward=1.0 if i % 2 == 0 else 0.0) for i in range(4)]  # fmt: skip
    as_matrix = [Rollout(f"{tag}-m{i}", "q 1", correct=False, fingerprint=rng.normal(size=4).astype(np.float32))
                 for i in range(3)]  # fmt: skip
    extras = [Rollout(f"{tag}-none", "q é 2"), Rollout(f"{tag}-u", "q é 2", fingerprint=np.ones(4, np.float32))]
    assert len(client.score(run, as_lists, step=1)) == 4
    results = client.score(run, [*as_matrix, *extras], step=None)
    assert [r.status for r in results[-2:]] == ["skipped", "scored"]
    assert {r.status for r in client.score(run, as_lists[:2], step=1)} == {"duplicate"}
    columns = client.score_columns(run, prompt_ids=["q 1", "q 3", "q 3"], rollout_ids=[f"{tag}-c{i}" for i in range(3)],
                                   correct=[False, True, None], fingerprints=rng.normal(size=(3, 4)).astype(np.float32),
                                   rewards=[0.0, 1.0, np.nan], texts=["a", None, "c"], step=2)  # fmt: skip
    assert columns.statuses == ["scored"] * 3 and np.isnan(columns.shaped_rewards[2])
    assert client.recluster(run).run == run
    assert client.recluster(run, all=True).refitted_keys >= 1
    near = Rollout(f"{tag}-m9", "q 1", correct=False, fingerprint=np.ones(4, dtype=np.float32))
    assert client.score(run, [as_matrix[0], near])
    assert client.get_run(run).stats["vectors"] >= 7
    assert run in [r.run for r in client.list_runs()]
    assert client.get_prompt(run, "q 1").groups["wrong"].vectors >= 4
    assert client.get_prompt(run, "q é 2").groups["unknown"].vectors == 1  # the skipped one is not stored
    with pytest.raises(ConflictError):
        client.put_run(run, {"knn_k": 5})
    with pytest.raises(BadRequestError):
        client.score(run, [Rollout(f"{tag}-bad", "q 1", fingerprint=[1.0, 2.0])])  # wrong dimension
    client.delete_run(run)
    with pytest.raises(NotFoundError):
        client.get_run(run)
    with pytest.raises(NotFoundError):
        client.delete_run(run)


@pytest.fixture(params=["sync", "async"])
def recorded(request: pytest.FixtureRequest, meds_server: str) -> Iterator[tuple[list[Exchange], dict[str, Any]]]:
    """Run the scenario with one kind of client; yield the exchanges and the live OpenAPI document."""
    spec = httpx.get(f"{meds_server}/openapi.json").json()
    if request.param == "sync":
        transport = RecordingTransport()
        with MedsClient(meds_server, http_client=httpx.Client(transport=transport)) as client:
            run_scenario(client, "sync")
        yield transport.exchanges, spec
    else:
        async_transport = AsyncRecordingTransport()
        view = SyncView(AsyncMedsClient(meds_server, http_client=httpx.AsyncClient(transport=async_transport)))
        try:
            run_scenario(view, "async")
        finally:
            view.close_view()
        yield async_transport.exchanges, spec


def test_every_request_validates_against_the_openapi_schema(recorded: tuple[list[Exchange], dict[str, Any]]) -> None:
    exchanges, spec = recorded
    covered = {(r.method, find_operation(spec, r)[1]) for r, _ in exchanges}
    operations = {
        (m.upper(), path)
        for path, ops in spec["paths"].items()
        for m, op in ops.items()
        if "explorer" not in op.get("tags", ())  # the page's read-only views: tests/unit/test_explorer_api.py
    }
    assert covered == operations  # every operation of the SDK
    for request, _ in exchanges:
        operation, template, params = find_operation(spec, request)
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                validator(spec, parameter["schema"]).validate(params[parameter["name"]])
        if request.content:
            media = request.headers["content-type"]
            assert media in ("application/json", "application/msgpack")
            schema = documented_body(operation, media)
            assert schema is not None, f"{request.method} {template} sends a {media} body the schema does not document"
            validator(spec, schema).validate(decode_body(media, request.content))


def test_every_response_matches_its_documented_schema(recorded: tuple[list[Exchange], dict[str, Any]]) -> None:
    exchanges, spec = recorded
    statuses = set()
    for request, response in exchanges:
        operation, _, _ = find_operation(spec, request)
        statuses.add(response.status_code)
        assert "x-request-id" in response.headers
        documented = operation["responses"].get(str(response.status_code))
        assert documented is not None, f"{request.method} {request.url.path}: undocumented {response.status_code}"
        media = response.headers.get("content-type", "application/json").split(";")[0]
        schema = documented.get("content", {}).get(media, {}).get("schema")
        if response.content and response.status_code != 204:
            assert schema is not None, f"{request.method} {request.url.path}: undocumented {media} answer"
            validator(spec, schema).validate(decode_body(media, response.content))
    assert {200, 201, 204, 404, 409} <= statuses and statuses & {400, 422}


def test_a_prompt_id_with_a_slash_can_be_read(meds_server: str) -> None:
    with MedsClient(meds_server) as client:
        client.score("slash", [Rollout("r", "gsm8k/train/12", correct=False, fingerprint=[1.0, 2.0])])
        assert client.get_prompt("slash", "gsm8k/train/12").groups["wrong"].vectors == 1


def find_operation(spec: dict[str, Any], request: httpx.Request) -> tuple[dict[str, Any], str, dict[str, str]]:
    raw_path = request.url.raw_path.decode("ascii").split("?")[0]
    for template, operations in spec["paths"].items():
        match = template_regex(template).fullmatch(raw_path)
        if match and request.method.lower() in operations:
            params = {name: unquote(value) for name, value in match.groupdict().items()}
            return operations[request.method.lower()], template, params
    raise AssertionError(f"{request.method} {raw_path} is not in the service's OpenAPI schema")


def template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)))


def documented_body(operation: dict[str, Any], media: str = "application/json") -> dict[str, Any] | None:
    content = operation.get("requestBody", {}).get("content", {})
    schema: dict[str, Any] | None = content.get(media, {}).get("schema")
    return schema


def decode_body(media: str, content: bytes) -> Any:
    """A body as JSON Schema sees it: msgpack binary values become base64 text (`format: binary` strings)."""
    if media == "application/json":
        return json.loads(content)

    def textual(value: Any) -> Any:
        if isinstance(value, bytes):
            return base64.b64encode(value).decode()
        if isinstance(value, dict):
            return {k: textual(v) for k, v in value.items()}
        if isinstance(value, list):
            return [textual(v) for v in value]
        return value

    return textual(msgpack.unpackb(content, raw=False))


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a schema fragment whose `#/components/...` references resolve in the spec."""
    return Draft202012Validator({**schema, "components": spec["components"]})
