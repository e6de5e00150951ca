"""The wire formats of a score request and its answer: one `WireCodec` per media type.

Each codec decodes a request body into columns (`RolloutBatch`), with every check that keeps bad input out
of memory, and encodes a `ScoreOutcome`. The route picks codecs by Content-Type and Accept from `CODECS`;
adding a wire format is one codec class and one entry there (docs/architecture.md, "Where to add things").
"""

from __future__ import annotations

import base64
import binascii
import math
import operator
from typing import Annotated, Any, Literal, NamedTuple, Protocol

import msgpack
import msgspec
import numpy as np
from msgspec import UNSET, UnsetType

from ..core.errors import InvalidInput, SchemaError
from ..core.types import NO_CLUSTER32, STATUSES, Group, RolloutBatch, ScoreOutcome
from .errors import validated
from .schemas import F32_MAX, MAX_ID_CHARS, MAX_STEP, ScoreRequest


def decode_score_request(body: bytes, *, max_batch: int, max_dim: int) -> RolloutBatch:
    """Parse and validate a score request body into columns.

    A plain body takes the fast path (`_fast_fields`); one that it cannot vouch for is validated by the wire
    model, `ScoreRequest`, which also words every error. Both paths accept the same bodies and give the same
    columns (tests/unit/test_json_decode.py).
    """
    fields = _fast_fields(body)
    if fields is None:
        fields = _model_fields(validated(ScoreRequest, body))
    _check_ids(fields.ids, max_batch)
    fingerprints, present = _fingerprints(fields, max_dim)
    # None becomes NaN in a float64 array; correctness maps through a table: no Python call per rollout.
    rewards = np.array(fields.rewards, dtype=np.float64)
    groups = np.fromiter(map(_GROUP_OF.__getitem__, fields.correct), dtype=np.int64, count=len(fields.ids))
    texts = fields.texts
    has_text = texts.count(None) != len(texts)
    return RolloutBatch(
        fields.ids, fields.prompts, groups, rewards, fingerprints, present, fields.step, texts if has_text else None
    )


class _Fields(NamedTuple):
    """A valid JSON score request as columns (one entry per rollout; None where a rollout left a field out)."""

    ids: list[str]
    prompts: list[str]
    correct: list[bool | None]
    fingerprints: list[list[float] | None]
    rows: list[int | None]
    rewards: list[float | None]
    texts: list[str | None]
    step: int | None
    matrix: tuple[list[int], str] | None  # fingerprint_matrix's shape and base64 data


def _model_fields(request: ScoreRequest) -> _Fields:
    rollouts = request.rollouts
    matrix = request.fingerprint_matrix
    return _Fields(
        [r["rollout_id"] for r in rollouts],
        [r["prompt_id"] for r in rollouts],
        [r.get("correct") for r in rollouts],
        [r.get("fingerprint") for r in rollouts],
        [r.get("fingerprint_row") for r in rollouts],
        [r.get("reward") for r in rollouts],
        [r.get("text") for r in rollouts],
        request.step,
        None if matrix is None else (matrix.shape, matrix.data),
    )


# ---- the JSON form's fast path -----------------------------------------------------------------------------
#
# msgspec decodes a score request into typed structs in one pass, in about half the time `ScoreRequest` takes
# (pydantic). Its types below accept a subset of what `ScoreRequest` accepts (no 85.0 for 85, no NaN, no
# number out of float64's range), with the model's bounds as msgspec constraints (id lengths in characters,
# counts >= 0, the step's range), and `_fast_fields` checks that no object repeats a key.
# Whatever either refuses goes to `ScoreRequest`, so the answers to bad bodies, and their messages, are the
# model's own. The structs are not tracked by the cyclic GC (they hold no containers but lists of numbers):
# 10^4 tracked objects per request would set off collections that scan every live object of the process.


_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_Count = Annotated[int, msgspec.Meta(ge=0)]


class _FastMatrix(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    shape: Annotated[list[_Count], msgspec.Meta(min_length=2, max_length=2)]
    data: str
    dtype: Literal["float32"] | UnsetType = UNSET


class _FastRollout(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    rollout_id: _Id
    prompt_id: _Id
    correct: bool | UnsetType | None = UNSET
    fingerprint: list[float] | UnsetType | None = UNSET
    fingerprint_row: _Count | UnsetType | None = UNSET
    reward: float | UnsetType | None = UNSET
    text: str | UnsetType | None = UNSET


class _FastRequest(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    rollouts: Annotated[list[_FastRollout], msgspec.Meta(min_length=1)]
    step: Annotated[int, msgspec.Meta(ge=0, le=MAX_STEP)] | UnsetType | None = UNSET
    fingerprint_matrix: _FastMatrix | UnsetType | None = UNSET


_FAST_DECODER = msgspec.json.Decoder(_FastRequest)
_OPTIONAL = [operator.attrgetter(name) for name in ("correct", "fingerprint", "fingerprint_row", "reward", "text")]


def _fast_fields(body: bytes) -> _Fields | None:
    """The columns of a body that is valid by `ScoreRequest`'s rules and repeats no key, or None when this path
    cannot tell (the model then decides)."""
    try:
        request = _FAST_DECODER.decode(body)
    except msgspec.DecodeError:  # also msgspec.ValidationError
        return None
    rollouts = request.rollouts
    n = len(rollouts)
    ids = list(map(_ROLLOUT_ID, rollouts))
    prompts = list(map(_PROMPT_ID, rollouts))
    keys = 2 * n  # members of the body's objects, for the repeated-key check below
    columns = []
    for get in _OPTIONAL:
        values = list(map(get, rollouts))
        absent = values.count(UNSET)
        keys += n - absent
        columns.append(values if not absent else [None if v is UNSET else v for v in values])
    correct, fingerprints, rows, rewards, texts = columns
    step = None if request.step is UNSET else request.step
    matrix = None if request.fingerprint_matrix is UNSET else request.fingerprint_matrix
    keys += 1 + (request.step is not UNSET) + (request.fingerprint_matrix is not UNSET)
    if matrix is not None:
        keys += 2 + (matrix.dtype is not UNSET)
    # Every key is followed by a colon, and outside strings nothing else is. The keys are field names (no colon),
    # and without \u003a escapes a string holds as many colons in the body as decoded: as many colons as parsed
    # members plus those in the decoded strings proves that no object repeated a key (a repeat adds a colon, and
    # drops a value that can only hold more). Otherwise the model's path finds the repeat, or there is none.
    strings = "".join(ids) + "".join(prompts) + "".join(filter(None, texts)) + ("" if matrix is None else matrix.data)
    if body.count(b":") != keys + strings.count(":") or b"\\u003" in body:
        return None
    matrix_spec = None if matrix is None else (matrix.shape, matrix.data)
    return _Fields(ids, prompts, correct, fingerprints, rows, rewards, texts, step, matrix_spec)


_ROLLOUT_ID = operator.attrgetter("rollout_id")
_PROMPT_ID = operator.attrgetter("prompt_id")


def _check_ids(ids: list[str], max_batch: int) -> None:
    if not ids:
        raise SchemaError("rollouts is empty")  # the schema states minItems 1: 422, as for other misfits
    if len(ids) > max_batch:
        raise InvalidInput(f"{len(ids)} rollouts in one request is over the limit of {max_batch}")
    if len(set(ids)) != len(ids):
        raise InvalidInput("rollout_id values repeat within the request")


def _fingerprints(fields: _Fields, max_dim: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(fields.ids)
    matrix = _matrix(*fields.matrix, max_dim) if fields.matrix else None
    given = fields.fingerprints
    lists = [i for i, v in enumerate(given) if v is not None] if given.count(None) != n else []
    rows = [i for i, r in enumerate(fields.rows) if r is not None] if fields.rows.count(None) != n else []
    if any(given[i] is not None for i in rows):
        raise InvalidInput("a rollout has both fingerprint and fingerprint_row")
    if rows and matrix is None:
        raise InvalidInput("fingerprint_row given without fingerprint_matrix")
    dims = {len(given[i] or ()) for i in lists}
    if matrix is not None and rows:
        dims.add(matrix.shape[1])
    if len(dims) > 1:
        raise InvalidInput(f"fingerprints of different lengths in one request: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    if dim == 0 and (lists or rows):
        raise InvalidInput("a fingerprint has no values")
    if dim > max_dim:
        raise InvalidInput(f"fingerprints have {dim} values, over the limit of {max_dim}")
    out = np.zeros((n, dim), dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    if lists:
        values = np.array(given if len(lists) == n else [given[i] for i in lists], dtype=np.float64)
        out[lists] = _as_float32(values, "fingerprint")
        present[lists] = True
    if rows:
        assert matrix is not None
        picks = [row for row in fields.rows if row is not None]  # those of `rows`, in order
        if max(picks) >= len(matrix):  # compared as Python ints: a row beyond int64 is refused, not an overflow
            raise InvalidInput(f"fingerprint_row {max(picks)} is outside fingerprint_matrix")
        out[rows] = matrix[np.array(picks, dtype=np.int64)]
        present[rows] = True
    return out, present


_GROUP_OF = {value: int(Group.of(value)) for value in (True, False, None)}


def _matrix(shape: list[int], data: str, max_dim: int) -> np.ndarray:
    rows, dim = shape
    if dim > max_dim:
        raise InvalidInput(f"fingerprint_matrix has {dim} columns, over the limit of {max_dim}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("fingerprint_matrix.data is not valid base64") from None
    return _float32_rows(raw, rows, dim, "fingerprint_matrix")


def _float32_rows(raw: bytes, rows: int, dim: int, what: str) -> np.ndarray:
    """A [rows, dim] matrix from little-endian float32 bytes, all finite."""
    if len(raw) != rows * dim * 4:
        raise InvalidInput(f"{what}.data has {len(raw)} bytes; shape [{rows}, {dim}] needs {rows * dim * 4}")
    matrix = np.frombuffer(raw, dtype="<f4").reshape(rows, dim).astype(np.float32)
    if not np.isfinite(matrix).all():
        raise InvalidInput(f"{what} values must be finite numbers (NaN or infinity found)")
    return matrix


def _as_float32(values: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InvalidInput(f"{what} values must be finite numbers")
    if (np.abs(values) > F32_MAX).any():
        raise InvalidInput(f"{what} values must fit in float32 (|x| <= {F32_MAX:.8g})")
    return values.astype(np.float32)


# ---- the compact columnar encoding (application/msgpack) -------------------------------------------------
#
# Request:  {"step"?: int, "rollout_id": [str], "prompt_id": [str], "correct"?: int8 bytes (1, 0, -1 = unknown),
#            "reward"?: float64 bytes (NaN = none), "fingerprints"?: {"dtype": "float32", "shape": [m, d],
#            "data": bytes}, "fingerprint_present"?: uint8 bytes (which rollouts own the m rows, in order;
#            absent = all of them), "text"?: [str | None]}
# Response: {"rollout_id": [str], "status": int8 bytes (0 scored, 1 skipped, 2 duplicate), "cluster": int32
#            bytes (-2^31 = none), "cluster_size": int32 bytes, "penalty": float64 bytes, "shaped_reward":
#            float64 bytes (NaN = none), "metrics": {name: float}, "metric_counts": {name: int}}
# All arrays little-endian, one entry per rollout in request order. It carries the same information as the
# JSON form without a Python object per rollout on either side.

MSGPACK = "application/msgpack"
_COLUMNS = {"step", "rollout_id", "prompt_id", "correct", "reward", "fingerprints", "fingerprint_present", "text"}


def decode_columns(body: bytes, *, max_batch: int, max_dim: int) -> RolloutBatch:
    """Parse and validate a columnar msgpack score request (the same checks as the JSON form)."""
    try:
        request = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
        raise InvalidInput("body is not valid msgpack") from None
    if not isinstance(request, dict):
        raise SchemaError("body must be a msgpack map")
    unknown = set(request) - _COLUMNS
    if unknown:
        raise SchemaError(f"unknown fields: {', '.join(sorted(map(str, unknown)))}")
    ids, prompts = _strings(request, "rollout_id"), _strings(request, "prompt_id")
    n = len(ids)
    _check_ids(ids, max_batch)
    if len(prompts) != n:
        raise SchemaError("rollout_id and prompt_id differ in length")
    correct = _column(request, "correct", "<i1", n, default=-1)
    if not np.isin(correct, (-1, 0, 1)).all():
        raise SchemaError("correct holds values other than 1, 0 and -1")
    rewards = _column(request, "reward", "<f8", n, default=np.nan)
    if np.isinf(rewards).any():
        raise InvalidInput("reward values must be finite")
    groups = np.where(correct == 1, int(Group.CORRECT), np.where(correct == 0, int(Group.WRONG), int(Group.UNKNOWN)))
    fingerprints, present = _column_fingerprints(request, n, max_dim)
    step = request.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP):
        raise SchemaError(f"step must be an integer from 0 to {MAX_STEP}")
    texts = _texts(request, n)
    return RolloutBatch(ids, prompts, groups.astype(np.int64), rewards, fingerprints, present, step, texts)


def _texts(request: dict[str, Any], n: int) -> list[str | None] | None:
    texts = request.get("text")
    if texts is None:
        return None
    if not isinstance(texts, list) or len(texts) != n or not all(t is None or isinstance(t, str) for t in texts):
        raise SchemaError(f"text must be a list of {n} strings or nulls")
    return texts


def encode_columns(outcome: ScoreOutcome) -> bytes:
    records = outcome.records
    return bytes(
        msgpack.packb(
            {
                "rollout_id": outcome.rollout_ids,
                "status": outcome.status.astype("<i1").tobytes(),
                "cluster": records["cluster"].astype("<i4").tobytes(),
                "cluster_size": records["size"].astype("<i4").tobytes(),
                "penalty": records["penalty"].astype("<f8").tobytes(),
                "shaped_reward": records["shaped"].astype("<f8").tobytes(),
                "metrics": outcome.metrics.metrics(),
                "metric_counts": outcome.metrics.counts(),
            }
        )
    )


def _strings(request: dict[str, Any], name: str) -> list[str]:
    values = request.get(name)
    if not isinstance(values, list):
        raise SchemaError(f"{name} must be a list of strings")
    # Checked in bulk (msgpack decodes strings as exact `str`): lengths by min/max over map, not per value.
    if set(map(type, values)) - {str} or (values and not 1 <= min(map(len, values)) <= max(map(len, values)) <= 512):
        raise SchemaError(f"{name} values must be strings of 1 to 512 characters")
    return values


def _column(request: dict[str, Any], name: str, dtype: str, n: int, default: float) -> np.ndarray:
    raw = request.get(name)
    if raw is None:
        return np.full(n, default, dtype=np.dtype(dtype).newbyteorder("="))
    if not isinstance(raw, bytes) or len(raw) != n * np.dtype(dtype).itemsize:
        raise SchemaError(f"{name} must be {n} {np.dtype(dtype).name} values as bytes")
    return np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))


def _column_fingerprints(request: dict[str, Any], n: int, max_dim: int) -> tuple[np.ndarray, np.ndarray]:
    spec = request.get("fingerprints")
    if spec is None:
        if request.get("fingerprint_present") is not None:
            raise InvalidInput("fingerprint_present given without fingerprints")
        return np.zeros((n, 0), dtype=np.float32), np.zeros(n, dtype=bool)
    if not isinstance(spec, dict) or set(spec) - {"dtype", "shape", "data"} or not isinstance(spec.get("data"), bytes):
        raise SchemaError("fingerprints must be a map of dtype, shape and data (bytes)")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v >= 0 for v in shape)):
        raise SchemaError("fingerprints.shape must be two non-negative integers")
    if spec.get("dtype", "float32") != "float32":
        raise SchemaError("fingerprints.dtype must be float32")
    rows, dim = shape
    if dim > max_dim:
        raise InvalidInput(f"fingerprints have {dim} values, over the limit of {max_dim}")
    if dim == 0 and rows:
        raise InvalidInput("a fingerprint has no values")
    matrix = _float32_rows(spec["data"], rows, dim, "fingerprints")
    flags = _column(request, "fingerprint_present", "<u1", n, default=1)
    if (flags > 1).any():
        raise SchemaError("fingerprint_present holds values other than 0 and 1")
    present = flags.astype(bool)
    if int(present.sum()) != rows:
        raise InvalidInput(f"fingerprint_present marks {int(present.sum())} rollouts for {rows} fingerprint rows")
    out = np.zeros((n, dim), dtype=np.float32)
    out[present] = matrix
    return out, present


# ---- the codecs -------------------------------------------------------------------------------------------


class WireCodec(Protocol):
    """One wire format of score requests and answers."""

    media_type: str

    def decode(self, body: bytes, *, max_batch: int, max_dim: int) -> RolloutBatch: ...
    def encode(self, outcome: ScoreOutcome) -> bytes: ...


class JsonCodec:
    """`application/json`: ScoreRequest in, ScoreResponse out (the default both ways)."""

    media_type = "application/json"

    def decode(self, body: bytes, *, max_batch: int, max_dim: int) -> RolloutBatch:
        return decode_score_request(body, max_batch=max_batch, max_dim=max_dim)

    def encode(self, outcome: ScoreOutcome) -> bytes:
        metrics = outcome.metrics
        return _JSON_ENCODER.encode(
            {"results": results_json(outcome), "metrics": metrics.metrics(), "metric_counts": metrics.counts()}
        )


class ColumnsCodec:
    """`application/msgpack`: the compact columnar form (ScoreColumnsRequest / ScoreColumnsResponse)."""

    media_type = MSGPACK

    def decode(self, body: bytes, *, max_batch: int, max_dim: int) -> RolloutBatch:
        return decode_columns(body, max_batch=max_batch, max_dim=max_dim)

    def encode(self, outcome: ScoreOutcome) -> bytes:
        return encode_columns(outcome)


JSON = JsonCodec()
CODECS: dict[str, WireCodec] = {codec.media_type: codec for codec in (JSON, ColumnsCodec())}


def request_codec(content_type: str) -> WireCodec:
    """The codec of a request body by its Content-Type (JSON when it names no other)."""
    return CODECS.get(content_type.split(";")[0].strip().lower(), JSON)


def response_codec(accept: str) -> WireCodec:
    """The codec of the answer: the first non-JSON format the Accept header names, else JSON."""
    for media_type, codec in CODECS.items():
        if codec is not JSON and media_type in accept:
            return codec
    return JSON


class _Result(msgspec.Struct, gc=False):
    """One entry of a JSON score answer's `results` (the wire model is `RolloutOut`). A struct, not a dict:
    built and encoded faster, and not tracked by the cyclic GC."""

    rollout_id: str
    status: str
    cluster: int | None
    cluster_size: int
    penalty: float
    shaped_reward: float | None


_JSON_ENCODER = msgspec.json.Encoder()


def results_json(outcome: ScoreOutcome) -> list[_Result]:
    """The `results` list of a JSON score answer, built from columns (fast for 10^4 rollouts)."""
    names = [s.value for s in STATUSES]
    records = outcome.records
    clusters = [None if c == NO_CLUSTER32 else c for c in records["cluster"].tolist()]
    shaped = [None if math.isnan(x) else x for x in records["shaped"].tolist()]
    statuses = [names[st] for st in outcome.status.tolist()]
    return list(
        map(
            _Result,
            outcome.rollout_ids,
            statuses,
            clusters,
            records["size"].tolist(),
            records["penalty"].tolist(),
            shaped,
        )
    )
