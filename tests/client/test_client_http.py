"""MedsClient and AsyncMedsClient against a scripted fake service (httpx.MockTransport).

Every test runs on both clients through the `make_client` fixture.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

import meds_client
from meds_client import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    Rollout,
    ServiceUnavailableError,
    UnprocessableEntityError,
    _json,
)
from meds_client._encoding import WIRE_CODECS, encode_score_body, encode_score_columns, wire_codec
from meds_client._types import ScoreResults
from tests.client._fakes import FakeService, decode_matrix, error_response, score_result


def rollouts(n: int, *, prompts: int = 1, dim: int = 4, numpy: bool = True) -> list[Rollout]:
    rng = np.random.default_rng(0)
    made = []
    for i in range(n):
        vector = rng.normal(size=dim).astype(np.float32)
        made.append(
            Rollout(
                f"r{i}",
                f"p{i % prompts}",
                correct=i % 2 == 0,
                fingerprint=vector if numpy else vector.tolist(),
            )
        )
    return made


# -- configuration and headers ----------------------------------------------------------------


def test_base_url_and_api_key_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, service: FakeService, make_client: Any
) -> None:
    monkeypatch.setenv("MEDS_URL", "http://from-env:9000/")
    monkeypatch.setenv("MEDS_API_KEY", "s3cret")
    client = make_client(base_url=None)
    client.health()
    request = service.requests[0]
    assert str(request.url) == "http://from-env:9000/healthz"
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["user-agent"] == f"meds-client/{meds_client.__version__}"


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch, service: FakeService, make_client: Any) -> None:
    monkeypatch.delenv("MEDS_URL", raising=False)
    monkeypatch.delenv("MEDS_API_KEY", raising=False)
    client = make_client(base_url=None, retries=3)
    client.health()
    assert str(service.requests[0].url) == "http://127.0.0.1:8000/healthz"
    assert "authorization" not in service.requests[0].headers
    assert client.timeout == httpx.Timeout(60.0)
    assert client.retry_policy.max_retries == 3


@pytest.mark.parametrize("bad", [{"on_error": "ignore"}, {"max_batch_rollouts": 0}])
def test_rejects_bad_options(bad: dict[str, Any], make_client: Any) -> None:
    with pytest.raises(ValueError):
        make_client(**bad)


# -- score: encoding --------------------------------------------------------------------------


def test_numpy_fingerprints_are_sent_as_one_float32_matrix(service: FakeService, make_client: Any) -> None:
    batch = rollouts(3)
    batch.insert(1, Rollout("no-fp", "p0", correct=False))
    results = make_client().score("run-1", batch, step=7)
    body = service.bodies()[0]
    assert service.requests[0].url.path == "/v1/runs/run-1/score"
    assert body["step"] == 7
    assert [r.get("fingerprint_row") for r in body["rollouts"]] == [0, None, 1, 2]
    assert all("fingerprint" not in r for r in body["rollouts"])
    matrix = decode_matrix(body["fingerprint_matrix"])
    np.testing.assert_array_equal(matrix, np.stack([r.fingerprint for r in batch if r.fingerprint is not None]))
    assert [r.status for r in results] == ["scored", "skipped", "scored", "scored"]


def test_list_fingerprints_are_sent_as_json(service: FakeService, make_client: Any) -> None:
    batch = rollouts(2, numpy=False)
    make_client().score("run-1", [{"rollout_id": "d", "prompt_id": "p9", "reward": 1.0}, *batch])
    body = service.bodies()[0]
    assert "fingerprint_matrix" not in body and "step" not in body
    assert body["rollouts"][0] == {
        "rollout_id": "d",
        "prompt_id": "p9",
        "correct": None,
        "reward": 1.0,
        "fingerprint": None,
    }
    assert body["rollouts"][1]["fingerprint"] == pytest.approx(batch[0].fingerprint)


def test_json_fingerprint_lists_go_in_float32_shortest_form(service: FakeService, make_client: Any) -> None:
    """The service keeps float32: each value is sent in the fewest digits that read back as the same float32
    (0.1, not its float64 widening 0.10000000149011612), half the bytes of a 14-dim batch."""
    values = np.float32([0.1, -2.5e-7, 3.4028235e38, 1 / 3])
    rng = np.random.default_rng(3)
    batch = [Rollout("a", "p", fingerprint=values.tolist())] + [
        Rollout(f"r{i}", "p", fingerprint=rng.standard_normal(14).astype(np.float32).tolist()) for i in range(50)
    ]
    make_client(wire="json").score("run-1", [Rollout("a", "p", fingerprint=values.tolist())])
    make_client(wire="json").score("run-1", batch[1:])
    first, second = service.bodies()
    assert np.array_equal(np.float32(first["rollouts"][0]["fingerprint"]), values)
    assert b"[0.1,-2.5e-7,3.4028235e+38,0.33333334]" in service.requests[0].content
    sent = np.float32([item["fingerprint"] for item in second["rollouts"]])
    assert np.array_equal(sent, np.float32([r.fingerprint for r in batch[1:]]))


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([Rollout("a", "p", fingerprint=[1.0, float("nan")])], "NaN"),
        ([Rollout("a", "p", fingerprint=np.array([1e39]))], "overflow"),
        ([Rollout("a", "p", fingerprint=[1.0]), Rollout("b", "p", fingerprint=[1.0, 2.0])], "one dimension"),
        ([Rollout("a", "p"), Rollout("a", "q")], "twice"),
        ([Rollout("", "p")], "rollout_id"),
        ([Rollout("a", "p" * 513)], "prompt_id"),
        ([Rollout("a", "p", fingerprint=np.ones((2, 2)))], "1-D"),
    ],
)
def test_invalid_batches_fail_before_sending(
    batch: list[Rollout], match: str, service: FakeService, make_client: Any
) -> None:
    with pytest.raises(ValueError, match=match):
        make_client().score("run-1", batch)
    assert service.requests == []


@pytest.mark.parametrize("run", ["", "a/b", "x" * 129, "spaces no"])
def test_invalid_run_ids_are_refused(run: str, make_client: Any) -> None:
    with pytest.raises(ValueError, match="run must match"):
        make_client().get_run(run)


# -- score: chunking --------------------------------------------------------------------------


def test_large_batches_are_chunked_by_prompt_and_reassembled_in_order(service: FakeService, make_client: Any) -> None:
    batch = rollouts(12, prompts=4)  # prompt p(i % 4): 3 rollouts each, interleaved
    results = make_client(max_batch_rollouts=7).score("run-1", batch, step=3)
    assert [r.rollout_id for r in results] == [r.rollout_id for r in batch]
    assert [r.penalty for r in results] == [0.0 if r.correct else 0.1 for r in batch]
    sent = service.bodies()
    assert [len(b["rollouts"]) for b in sent] == [6, 6]
    assert all(b["step"] == 3 for b in sent)
    prompts_per_request = [{r["prompt_id"] for r in b["rollouts"]} for b in sent]
    assert prompts_per_request[0].isdisjoint(prompts_per_request[1])


def test_a_prompt_larger_than_a_request_is_split(
    service: FakeService, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    batch = rollouts(5, prompts=1)
    with caplog.at_level(logging.WARNING, logger="meds_client"):
        results = make_client(max_batch_rollouts=2).score("run-1", batch)
    assert [len(b["rollouts"]) for b in service.bodies()] == [2, 2, 1]
    assert [r.rollout_id for r in results] == [f"r{i}" for i in range(5)]
    assert "splitting it" in caplog.text


def test_byte_budget_limits_rollouts_per_request(service: FakeService, make_client: Any) -> None:
    batch = rollouts(8, prompts=8, dim=1000)
    make_client(max_batch_bytes=20_000).score("run-1", batch)
    assert [len(b["rollouts"]) for b in service.bodies()] == [3, 3, 2]
    assert all(len(r.content) <= 20_000 for r in service.requests)


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_resent_with_the_same_rollout_ids(
    status: int, service: FakeService, make_client: Any
) -> None:
    service.script = [error_response(status), error_response(status)]
    client = make_client()
    results = client.score("run-1", rollouts(2))
    assert len(service.requests) == 3 and len(results) == 2
    assert service.requests[0].content == service.requests[2].content
    assert client.stats.retries == 2 and client.stats.requests == 3


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
    ],
)
def test_client_errors_are_not_retried(
    status: int, error: type[APIStatusError], service: FakeService, make_client: Any
) -> None:
    service.script = [error_response(status)]
    with pytest.raises(error) as caught:
        make_client().score("run-1", rollouts(1))
    assert len(service.requests) == 1
    assert caught.value.status_code == status and caught.value.request_id == "req-1"
    assert caught.value.body["error"]["type"] == "some_error"


@pytest.mark.parametrize(
    ("status", "error"), [(429, RateLimitError), (500, InternalServerError), (503, ServiceUnavailableError)]
)
def test_retries_are_bounded(status: int, error: type[APIStatusError], service: FakeService, make_client: Any) -> None:
    service.script = [error_response(status)] * 10
    with pytest.raises(error):
        make_client().score("run-1", rollouts(1))
    assert len(service.requests) == 4  # 1 + 3 retries


def test_retry_after_is_honoured(service: FakeService, make_client: Any) -> None:
    service.script = [
        error_response(503, headers={"Retry-After": "2.5"}),
        error_response(429, headers={"Retry-After": "600"}),
    ]
    client = make_client(retries=meds_client.RetryPolicy(initial_delay=0.5, jitter=0.0))
    client.score("run-1", rollouts(1))
    assert client.slept == [2.5, 1.0]  # 600 s is over the 60 s cap: backoff (0.5 * 2**1) instead


def test_connection_errors_are_retried_then_raised(service: FakeService, make_client: Any) -> None:
    service.script = [httpx.ConnectError("refused")] * 4
    with pytest.raises(APIConnectionError) as caught:
        make_client().score("run-1", rollouts(1))
    assert not isinstance(caught.value, APITimeoutError)
    assert len(service.requests) == 4


def test_timeouts_raise_api_timeout_error(service: FakeService, make_client: Any) -> None:
    service.script = [httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow")]
    with pytest.raises(APITimeoutError):
        make_client(retries=1).score("run-1", rollouts(1))
    assert len(service.requests) == 2


def test_request_id_falls_back_to_the_header(service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(404, text="not json", headers={"X-Request-ID": "hdr-9"})]
    with pytest.raises(NotFoundError) as caught:
        make_client().get_run("missing")
    assert caught.value.request_id == "hdr-9" and caught.value.body == "not json"
    assert "hdr-9" in str(caught.value)


def test_authentication_error_says_how_to_configure_the_key(
    monkeypatch: pytest.MonkeyPatch, service: FakeService, make_client: Any
) -> None:
    monkeypatch.delenv("MEDS_API_KEY", raising=False)
    service.script = [error_response(401)]
    with pytest.raises(AuthenticationError, match="MEDS_API_KEY"):
        make_client().list_runs()


# -- degraded mode ----------------------------------------------------------------------------


def test_degraded_mode_returns_zero_penalties_with_status_error(
    service: FakeService, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    service.script = [httpx.ConnectError("down")] * 4
    client = make_client(on_error="zero", max_batch_rollouts=2)
    with caplog.at_level(logging.ERROR, logger="meds_client"):
        results = client.score("run-1", rollouts(4, prompts=2))
    assert [r.status for r in results] == ["error", "scored", "error", "scored"]
    assert [r.penalty for r in results] == [0.0, 0.1, 0.0, 0.1]
    assert client.stats.degraded_batches == 1 and client.stats.degraded_rollouts == 2
    assert "penalty 0" in caplog.text


@pytest.mark.parametrize("status", [401, 403, 404, 409])
def test_degraded_mode_still_raises_on_misconfiguration(status: int, service: FakeService, make_client: Any) -> None:
    service.script = [error_response(status)]
    with pytest.raises(APIStatusError):
        make_client(on_error="zero").score("run-1", rollouts(1))


def test_degraded_mode_covers_a_rejected_batch(service: FakeService, make_client: Any) -> None:
    service.script = [error_response(422)]
    assert [r.status for r in make_client(on_error="zero").score("run-1", rollouts(2))] == ["error", "error"]


# -- response parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"results": []},
        {"results": [{"rollout_id": "other", "status": "scored", "cluster": None, "cluster_size": 0, "penalty": 0}]},
        {"wrong": 1},
        [1, 2],
        {"results": [{"rollout_id": "r0", "status": "weird", "cluster_size": 0, "penalty": 0}]},
        {"results": [{"rollout_id": "r0", "status": "scored", "cluster": None, "cluster_size": 0}]},
        {"results": [{"rollout_id": "r0", "status": "scored", "cluster": {"a": 1}, "cluster_size": 0, "penalty": 0}]},
    ],
)
def test_malformed_score_responses_raise(body: Any, service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(200, json=body)]
    with pytest.raises(APIResponseValidationError):
        make_client().score("run-1", rollouts(1))


# -- run management ---------------------------------------------------------------------------

RUN_BODY = {"run": "run-1", "config": {"alpha": 0.1}, "stats": {"keys": 0, "vectors": 0}}


@pytest.mark.parametrize(("status", "created"), [(201, True), (200, False)])
def test_put_run(status: int, created: bool, service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(status, json=RUN_BODY)]
    run = make_client().put_run("run-1", {"alpha": 0.2})
    assert run.created is created and run.config == {"alpha": 0.1} and run.stats["keys"] == 0
    assert service.requests[0].method == "PUT" and service.bodies() == [{"alpha": 0.2}]


def test_create_run_is_put_run(service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(201, json=RUN_BODY)]
    assert make_client().create_run("run-1").created
    assert service.bodies() == [{}]


def test_list_get_delete(service: FakeService, make_client: Any) -> None:
    service.script = [
        httpx.Response(200, json={"runs": [RUN_BODY]}),
        httpx.Response(200, json=RUN_BODY),
        httpx.Response(204),
    ]
    client = make_client()
    assert [r.run for r in client.list_runs()] == ["run-1"]
    assert client.get_run("run-1").run == "run-1"
    assert client.delete_run("run-1") is None
    assert [(r.method, r.url.path) for r in service.requests] == [
        ("GET", "/v1/runs"),
        ("GET", "/v1/runs/run-1"),
        ("DELETE", "/v1/runs/run-1"),
    ]


def test_recluster(service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(200, json={"run": "run-1", "refitted_keys": 3, "vectors": 40, "seconds": 0.5})]
    result = make_client().recluster("run-1", all=True)
    assert (result.refitted_keys, result.vectors, result.seconds) == (3, 40, 0.5)
    assert service.bodies() == [{"all": True}]


def test_get_prompt_quotes_the_prompt_id(service: FakeService, make_client: Any) -> None:
    group = {
        "vectors": 3,
        "fitted": 3,
        "pending_refit": False,
        "clusters": {"-1": 1, "0": 2},
        "labels": [0, -1, 0],
    }
    service.script = [httpx.Response(200, json={"prompt_id": "a b/c", "groups": {"wrong": group}})]
    memory = make_client().get_prompt("run-1", "a b/c")
    assert service.requests[0].url.raw_path == b"/v1/runs/run-1/prompts/a%20b%2Fc"
    assert memory.groups["wrong"].clusters == {-1: 1, 0: 2} and memory.groups["wrong"].labels == [0, -1, 0]


@pytest.mark.parametrize(("status", "ready"), [(200, True), (503, False)])
def test_ready_is_a_boolean_and_not_retried(status: int, ready: bool, service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(status, json={"ready": ready})]
    assert make_client().ready() is ready
    assert len(service.requests) == 1


def test_health_accepts_plain_text(service: FakeService, make_client: Any) -> None:
    service.script = [httpx.Response(200, text="ok")]
    assert make_client().health() == {"status": "ok"}


def test_columnar_msgpack_carries_what_json_does(service: FakeService, make_client: Any) -> None:
    batch = rollouts(3)
    batch.insert(1, Rollout("no-fp", "p0", correct=None, reward=0.5))
    as_json = make_client().score("run-1", batch, step=7)
    as_columns = make_client(wire="msgpack").score("run-1", batch, step=7)
    json_request, columns_request = service.requests
    assert columns_request.headers["content-type"] == "application/msgpack"
    assert columns_request.headers["accept"] == "application/msgpack"
    assert service.bodies()[0] == service.bodies()[1]  # the same request, two encodings
    assert as_columns == as_json
    assert len(columns_request.content) < len(json_request.content)


def test_a_columnar_answer_is_read(service: FakeService, make_client: Any) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        ids = msgpack.unpackb(request.content)["rollout_id"]
        n = len(ids)
        wire = {
            "rollout_id": ids,
            "status": np.array([0, 1, 2][:n], "<i1").tobytes(),
            "cluster": np.array([-1, np.iinfo(np.int32).min, 3][:n], "<i4").tobytes(),
            "cluster_size": np.array([2, 0, 5][:n], "<i4").tobytes(),
            "penalty": np.array([0.1, 0.0, 0.17][:n], "<f8").tobytes(),
            "shaped_reward": np.array([-0.1, np.nan, 0.83][:n], "<f8").tobytes(),
        }
        return httpx.Response(200, content=msgpack.packb(wire), headers={"content-type": "application/msgpack"})

    service.script.append(answer)
    results = make_client(wire="msgpack").score("run-1", rollouts(3))
    assert [(r.status, r.cluster, r.cluster_size, r.penalty, r.shaped_reward) for r in results] == [
        ("scored", -1, 2, 0.1, -0.1), ("skipped", None, 0, 0.0, None), ("duplicate", 3, 5, 0.17, 0.83)
    ]  # fmt: skip
    service.script.append(httpx.Response(200, content=b"\xc1", headers={"content-type": "application/msgpack"}))
    with pytest.raises(APIResponseValidationError, match="msgpack"):
        make_client(wire="msgpack").score("run-1", rollouts(1))


def test_unknown_wire_is_refused(make_client: Any) -> None:
    with pytest.raises(ValueError, match="wire"):
        make_client(wire="xml")


def test_wire_picks_a_codec_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wire_codec("auto") is WIRE_CODECS["msgpack"]  # msgpack is installed here
    assert wire_codec("json") is WIRE_CODECS["json"] and wire_codec("msgpack") is WIRE_CODECS["msgpack"]
    with pytest.raises(ValueError, match=r"^wire must be 'auto', 'json' or 'msgpack', got 'xml'$"):
        wire_codec("xml")
    monkeypatch.setattr(WIRE_CODECS["msgpack"], "available", False)  # as where msgpack is not installed
    assert wire_codec("auto") is WIRE_CODECS["json"]
    with pytest.raises(ValueError, match=re.escape("wire='msgpack' needs msgpack: pip install 'meds-client[fast]'")):
        wire_codec("msgpack")


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_each_codec_sends_its_encoding_with_its_headers(wire: str, service: FakeService, make_client: Any) -> None:
    batch = rollouts(3, prompts=2)
    batch.append(Rollout("no-fp", "p0", correct=None, reward=0.5, text="t"))
    make_client(wire=wire).score("run-1", batch, step=4)
    (request,) = service.requests
    codec = WIRE_CODECS[wire]
    assert (request.headers["content-type"], request.headers["accept"]) == (codec.content_type, codec.accept)
    # One request holds the batch: sent as it is, in the caller's order.
    expected = (
        _json.dumps(encode_score_body(batch, 4), checked=True) if wire == "json" else encode_score_columns(batch, 4)
    )
    assert request.content == expected


def test_a_new_wire_format_is_one_entry_in_the_table(
    monkeypatch: pytest.MonkeyPatch, service: FakeService, make_client: Any
) -> None:
    class TaggedJson:
        """JSON under another media type: what a new format needs to provide, and nothing more."""

        name, content_type, accept, available, missing = "tagged", "application/x-tagged", "application/json", True, ""

        def encode(self, batch: Any, step: int | None) -> bytes:
            return b"tagged:" + WIRE_CODECS["json"].encode(batch, step)

        def read(self, response: httpx.Response) -> ScoreResults:
            return WIRE_CODECS["json"].read(response)

    def answer(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content.removeprefix(b"tagged:"))["rollouts"]
        return httpx.Response(200, json={"results": [score_result(r) for r in sent]})

    monkeypatch.setitem(WIRE_CODECS, "tagged", TaggedJson())
    service.script.append(answer)
    results = make_client(wire="tagged").score("run-1", rollouts(2))
    (request,) = service.requests
    assert request.headers["content-type"] == "application/x-tagged" and request.content.startswith(b"tagged:{")
    assert [r.rollout_id for r in results] == ["r0", "r1"]
