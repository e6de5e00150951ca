"""The JSON score request's two decoders agree: the fast path (msgspec, `_fast_fields`) takes only bodies that
the wire model (`ScoreRequest`, pydantic) accepts, and gives the same columns from them, bit for bit; plain
bodies do take it."""

from __future__ import annotations

import gc
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meds_service.api import codec
from meds_service.api.errors import validated
from meds_service.api.schemas import ScoreRequest
from meds_service.core.errors import MedsError
from meds_service.core.types import RESULT_DTYPE, ScoreOutcome

FIELDS = ["rollout_id", "prompt_id", "correct", "fingerprint", "fingerprint_row", "reward", "text"]

RAW_COLON = "raw colon"  # written into the body as the string "\u003a" (a colon, escaped)
# Values of every JSON kind, edge values most often: those that the model refuses next to those it takes (85.0
# as a count, 2^63 as a step, empty and overlong ids, colons, raw and escaped).
EDGE_VALUES = [None, True, 0, -1, 1, 85.0, 2**63 - 1, 2**63, 2**64, -(2**63), 1e308, -0.0, 0.5, [], [1, "2"], {"a": 1}]
EDGE_STRINGS = ["", "x" * 512, "x" * 513, "é" * 512, "é" * 513, "a:b", ":", "::", "\\u003a", RAW_COLON, "float32"]
EDGES = st.sampled_from([*EDGE_VALUES, *EDGE_STRINGS])
ODD = st.one_of(
    EDGES,
    EDGES,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=3),
    st.lists(st.integers(min_value=-(2**66), max_value=2**66), max_size=3),
)
ID = st.text(alphabet="abcdefg0123456789_-:", min_size=1, max_size=8)
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def plain_rollout(draw: st.DrawFn, dim: int) -> dict[str, Any]:
    """A rollout the model accepts: optional fields present or left out, values of their types."""
    item: dict[str, Any] = {"rollout_id": draw(ID), "prompt_id": draw(ID)}
    if draw(st.booleans()):
        item["correct"] = draw(st.sampled_from([True, False, None]))
    if draw(st.booleans()):
        item["fingerprint"] = draw(st.one_of(st.none(), st.lists(FLOAT32, min_size=dim, max_size=dim)))
    if draw(st.booleans()):
        item["reward"] = draw(
            st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-9, 9))
        )
    if draw(st.booleans()):
        item["text"] = draw(st.one_of(st.none(), st.text(max_size=5), st.sampled_from([":", "a: b"])))
    return item


@st.composite
def plain_body(draw: st.DrawFn) -> bytes:
    dim = draw(st.integers(1, 4))
    rollouts = draw(st.lists(plain_rollout(dim), min_size=1, max_size=6, unique_by=lambda r: r["rollout_id"]))
    body: dict[str, Any] = {"rollouts": rollouts}
    if draw(st.booleans()):
        body["step"] = draw(st.integers(0, 2**63 - 1))
    return json.dumps(body).encode()


@st.composite
def odd_body(draw: st.DrawFn) -> bytes:
    """A plain body with one or two things odd: a value of another kind or range, a repeated or unknown key, an
    odd step or fingerprint matrix, an escaped colon."""
    dim = draw(st.integers(1, 3))
    plain = draw(st.lists(plain_rollout(dim), max_size=4, unique_by=lambda r: r["rollout_id"]))
    rollouts = [list(item.items()) for item in plain]
    top: list[tuple[str, Any]] = [("rollouts", rollouts)]
    if draw(st.booleans()):
        top.append(("step", draw(st.integers(0, 9))))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["value", "repeat", "unknown", "step", "matrix"]))
        if kind in ("value", "repeat", "unknown") and rollouts:
            pairs = draw(st.sampled_from(rollouts))
            name = "extra" if kind == "unknown" else draw(st.sampled_from(FIELDS))
            if kind == "value":
                pairs[:] = [(k, v) for k, v in pairs if k != name]
            pairs.insert(draw(st.integers(0, len(pairs))), (name, draw(ODD)))
        elif kind == "step":
            top = [pair for pair in top if pair[0] != "step"] + [("step", draw(ODD))]
        elif kind == "matrix":
            matrix = [("shape", draw(st.one_of(st.just([1, dim]), ODD))), ("data", "AACAPwAAAEA=")]
            if draw(st.booleans()):
                matrix.append(("dtype", draw(st.sampled_from(["float32", "float64", 1, RAW_COLON]))))
            top.append(("fingerprint_matrix", matrix))
    return obj(draw(st.permutations(top))).encode()


def obj(pairs: list[tuple[str, Any]]) -> str:
    """A JSON object of these pairs, in order, repeats included; lists of pairs are objects too."""
    return "{" + ",".join(f"{json.dumps(k)}:{value(v)}" for k, v in pairs) + "}"


def value(v: Any) -> str:
    if isinstance(v, list) and v and all(isinstance(p, tuple) for p in v):
        return obj(v)
    if isinstance(v, list) and v and all(isinstance(p, list) for p in v):  # rollouts: a list of pair lists
        return "[" + ",".join(value(p) if p else "{}" for p in v) + "]"
    return encoded(v)


def encoded(value: Any) -> str:
    return '"\\u003a"' if value == RAW_COLON else json.dumps(value)


def model_fields(body: bytes) -> codec._Fields | None:
    try:
        return codec._model_fields(validated(ScoreRequest, body))
    except MedsError:
        return None


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, floats bit for bit (-0.0 is not 0.0)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1.0, a) == math.copysign(1.0, b) and a == b
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=plain_body())
def test_plain_bodies_take_the_fast_path_with_the_models_columns(body: bytes) -> None:
    fast = codec._fast_fields(body)
    assert fast is not None
    assert same(list(fast), list(model_fields(body) or ()))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=odd_body())
def test_the_fast_path_takes_only_what_the_model_accepts(body: bytes) -> None:
    fast = codec._fast_fields(body)
    if fast is not None:
        model = model_fields(body)
        assert model is not None, body
        assert same(list(fast), list(model)), body


def _one(top: dict[str, Any] | None = None, **rollout: Any) -> bytes:
    """A body of one rollout ("a" of prompt "p", with these fields) and these top-level fields, in UTF-8."""
    body = {"rollouts": [{"rollout_id": "a", "prompt_id": "p", **rollout}], **(top or {})}
    return json.dumps(body, ensure_ascii=False).encode()


def _matrix(**fields: Any) -> dict[str, Any]:
    return {"fingerprint_matrix": {"shape": [1, 2], "data": "AACAPwAAAEA=", **fields}}


# Each bound of the model next to the value just inside it: hypothesis draws them only now and then.
OUT_OF_BOUNDS = [
    b'{"rollouts": []}',
    _one({"step": 2**63}),
    _one({"step": 2**64}),
    _one({"step": -1}),
    _one(rollout_id="x" * 513),
    _one(prompt_id="é" * 513),
    _one(rollout_id=""),
    _one(prompt_id=""),
    _one(_matrix(), fingerprint_row=-1),
    _one(_matrix(dtype="f4"), fingerprint_row=0),
    _one(_matrix(shape=[2]), fingerprint_row=0),
    _one(_matrix(shape=[1, 2, 1]), fingerprint_row=0),
    _one(_matrix(shape=[-1, 2]), fingerprint_row=0),
]
IN_BOUNDS = [
    _one({"step": 2**63 - 1}),
    _one({"step": 0}),
    _one(rollout_id="x" * 512, prompt_id="é" * 512),
    _one(_matrix(dtype="float32"), fingerprint_row=0),
]


@pytest.mark.parametrize("body", OUT_OF_BOUNDS)
def test_a_value_just_out_of_the_models_bounds_is_left_to_the_model_which_refuses_it(body: bytes) -> None:
    assert model_fields(body) is None
    assert codec._fast_fields(body) is None


@pytest.mark.parametrize("body", IN_BOUNDS)
def test_a_value_at_the_models_bounds_takes_the_fast_path(body: bytes) -> None:
    fast = codec._fast_fields(body)
    assert fast is not None
    assert same(list(fast), list(model_fields(body) or ()))


@pytest.mark.parametrize(
    "body",
    [
        b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "rollout_id": "b"}]}',
        b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p"}], "step": 1, "step": 2}',
        b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint_row": 0}], "fingerprint_matrix": '
        b'{"shape": [1, 2], "data": "AACAPwAAAEA=", "data": "AACAPwAAAEA="}}',
        # the repeat adds a colon, and the escaped colon in the value that stays would make up for it
        b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "text": "x", "text": "\\u003a"}]}',
    ],
)
def test_a_repeated_key_is_left_to_the_model_which_refuses_it(body: bytes) -> None:
    assert codec._fast_fields(body) is None
    with pytest.raises(MedsError, match="repeats a key"):
        codec.decode_score_request(body, max_batch=100, max_dim=100)


def test_both_paths_give_the_same_batch() -> None:
    """Through `decode_score_request`: a body on the fast path, and the same body with an escaped colon in an id
    (which sends it to the model's path), decode to the same columns."""
    rng = np.random.default_rng(0)
    rollouts = [
        {"rollout_id": f"r{i}", "prompt_id": f"p{i % 3}", "correct": [True, False, None][i % 3],
         "fingerprint": rng.standard_normal(5).astype(np.float32).tolist(), "reward": float(i)}
        for i in range(30)
    ]  # fmt: skip
    fast_body = json.dumps({"rollouts": rollouts, "step": 4}).encode()
    slow_body = fast_body.replace(b'"r0"', b'"r\\u003a0"')
    assert codec._fast_fields(fast_body) is not None and codec._fast_fields(slow_body) is None
    fast = codec.decode_score_request(fast_body, max_batch=100, max_dim=100)
    slow = codec.decode_score_request(slow_body, max_batch=100, max_dim=100)
    assert slow.rollout_ids[0] == "r:0" and fast.rollout_ids[1:] == slow.rollout_ids[1:]
    for name in ("prompt_ids", "groups", "rewards", "fingerprints", "has_fingerprint", "step", "texts"):
        assert np.array_equal(np.asarray(getattr(fast, name)), np.asarray(getattr(slow, name))), name


@pytest.mark.parametrize("row", [1, 2**63, 2**70])
def test_a_fingerprint_row_beyond_the_matrix_is_refused_however_large(row: int) -> None:
    body = (
        b'{"rollouts": [{"rollout_id": "a", "prompt_id": "p", "fingerprint_row": %d}], '
        b'"fingerprint_matrix": {"shape": [1, 2], "data": "AACAPwAAAEA="}}' % row
    )
    with pytest.raises(MedsError, match=f"fingerprint_row {row} is outside fingerprint_matrix"):
        codec.decode_score_request(body, max_batch=10, max_dim=10)


def test_a_request_and_its_answer_make_no_object_per_rollout_that_the_cyclic_gc_tracks() -> None:
    """10^4 tracked objects per request set off collections that scan every live object of the process: a
    request of 8,192 rollouts triggered 31 young and 0.2 full collections on the decode and the answer, 10 and
    0.05 with untracked structs."""
    body = json.dumps({"rollouts": [{"rollout_id": f"r{i}", "prompt_id": "p", "reward": 1.0} for i in range(3)]})
    request = codec._FAST_DECODER.decode(body.encode())
    assert not gc.is_tracked(request) and not any(gc.is_tracked(r) for r in request.rollouts)
    outcome = ScoreOutcome(["a", "b"], np.zeros(2, np.int8), np.zeros(2, dtype=RESULT_DTYPE))
    assert not any(gc.is_tracked(r) for r in codec.results_json(outcome))
    answer = json.loads(codec.JSON.encode(outcome))
    assert [r["rollout_id"] for r in answer["results"]] == ["a", "b"] and set(answer["results"][0]) == {
        "rollout_id",
        "status",
        "cluster",
        "cluster_size",
        "penalty",
        "shaped_reward",
    }
