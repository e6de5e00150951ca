"""Turning rollouts into score requests: validation, compact fingerprints, chunking by prompt, and the
wire codecs (`WIRE_CODECS`) that encode a chunk and read the answer in one wire format each."""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np
import numpy.typing as npt

from . import _json
from ._exceptions import APIResponseValidationError
from ._types import Rollout, ScoreResults

try:  # optional: the compact columnar wire form (`meds-client[fast]`)
    import msgpack
except ImportError:  # pragma: no cover - exercised where msgpack is absent
    msgpack = None

logger = logging.getLogger("meds_client")

MSGPACK = "application/msgpack"
MAX_ID_LENGTH = 512
_FIXED_BYTES_PER_ROLLOUT = 160
"""JSON keys, punctuation, booleans and the result of one rollout, rounded up."""
_JSON_BYTES_PER_FLOAT = 24
_BINARY_BYTES_PER_FLOAT = 6
"""4 bytes of float32, as base64 (4/3), rounded up."""


JSON = "application/json"


class WireCodec(Protocol):
    """One wire format of score requests and answers, as the client speaks it (the service's side is
    `WireCodec` in meds_service/api/codec.py)."""

    name: str
    """The `wire=` option that picks it."""
    content_type: str
    """The Content-Type of the requests it encodes."""
    accept: str
    """The Accept header of its requests: the answer form it asks for."""
    available: bool
    """Whether its libraries are installed (`missing` says how to install them)."""
    missing: str

    def encode(self, rollouts: Sequence[Rollout], step: int | None) -> bytes:
        """The body of one score request; ValueError when a rollout cannot be sent."""
        ...

    def read(self, response: httpx.Response) -> ScoreResults:
        """The results of a score answer; APIResponseValidationError when it is unreadable."""
        ...


class JsonWire:
    """`application/json` both ways: readable everywhere, needs nothing beyond the client."""

    name = "json"
    content_type = JSON
    accept = JSON
    available = True
    missing = ""

    def encode(self, rollouts: Sequence[Rollout], step: int | None) -> bytes:
        return _json.dumps(encode_score_body(rollouts, step), checked=True)

    def read(self, response: httpx.Response) -> ScoreResults:
        body = read_json_object(response)
        return ScoreResults.from_json(body["results"]).add_metrics(body.get("metrics"), body.get("metric_counts"))


class ColumnsWire:
    """`application/msgpack` both ways: the compact columnar form (`meds-client[fast]`). An answer in
    JSON (a service that does not speak msgpack) is read as JSON."""

    name = "msgpack"
    content_type = MSGPACK
    accept = MSGPACK
    available = msgpack is not None
    missing = "msgpack: pip install 'meds-client[fast]'"

    def encode(self, rollouts: Sequence[Rollout], step: int | None) -> bytes:
        return encode_score_columns(rollouts, step)

    def read(self, response: httpx.Response) -> ScoreResults:
        if not response.headers.get("content-type", "").startswith(MSGPACK):
            return JSON_WIRE.read(response)
        try:
            return unpack_columns(response.content)
        except ValueError as exc:
            raise APIResponseValidationError(f"unreadable msgpack answer: {exc}", response=response) from exc


JSON_WIRE = JsonWire()
WIRE_CODECS: dict[str, WireCodec] = {codec.name: codec for codec in (ColumnsWire(), JSON_WIRE)}
"""Every wire format by its `wire=` name, in the order `wire="auto"` prefers them when installed."""


def wire_codec(wire: str) -> WireCodec:
    """The codec the `wire=` option picks: the named one, or (`auto`) the first installed one."""
    if wire == "auto":
        return next(codec for codec in WIRE_CODECS.values() if codec.available)
    codec = WIRE_CODECS.get(wire)
    if codec is None:
        names = ["auto", *sorted(WIRE_CODECS)]
        raise ValueError(f"wire must be {', '.join(map(repr, names[:-1]))} or {names[-1]!r}, got {wire!r}")
    if not codec.available:
        raise ValueError(f"wire={wire!r} needs {codec.missing}")
    return codec


def read_json_object(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of an answer; APIResponseValidationError when it is not one."""
    try:
        body = _json.loads(response.content)
    except ValueError as exc:
        raise APIResponseValidationError(f"response is not JSON: {exc}", response=response) from exc
    if not isinstance(body, dict):
        raise APIResponseValidationError("response is not a JSON object", response=response)
    return body


@dataclass(frozen=True)
class ScoreChunk:
    """One score request: the rollouts it carries, where they sit in the caller's list, and its body in
    the wire format of `codec` (both None for rollouts that are not sent)."""

    positions: list[int]
    rollout_ids: list[str]
    content: bytes | None = None
    codec: WireCodec | None = None


def coerce_rollouts(rollouts: Iterable[Rollout | Mapping[str, Any]]) -> list[Rollout]:
    """Accept `Rollout`s or plain dicts with the same keys; check what the service would reject anyway."""
    coerced = [item if isinstance(item, Rollout) else Rollout(**item) for item in rollouts]
    ids = [r.rollout_id for r in coerced]
    for name, values in (("rollout_id", ids), ("prompt_id", [r.prompt_id for r in coerced])):
        if not all(type(v) is str for v in values) or (
            values and not 1 <= min(map(len, values)) <= max(map(len, values)) <= MAX_ID_LENGTH
        ):
            for value in values:  # say which one
                _check_id(name, value)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        repeated = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"rollout_id {repeated!r} appears twice in one batch")
    return coerced


def plan_chunks(
    rollouts: Sequence[Rollout], *, max_rollouts: int, max_bytes: int, step: int | None, codec: WireCodec = JSON_WIRE
) -> list[ScoreChunk]:
    """Split a batch into requests without splitting a prompt's rollouts when it can be avoided.

    Rollouts of one batch must not see each other (docs/architecture.md, "The algorithm", step 3); keys
    are per prompt, so keeping each prompt's rollouts in one request keeps that true even when the batch
    needs several requests.
    Only a single prompt with more rollouts than fit in a request is split (with a warning).
    """
    limit = max(1, min(max_rollouts, max_bytes // _estimated_bytes_per_rollout(rollouts)))
    chunks: list[list[int]] = []
    current: list[int] = []
    for group in _positions_by_prompt(rollouts):
        if len(group) > limit:
            logger.warning(
                "prompt %r has %d rollouts in one batch, more than one request holds (%d); splitting it",
                rollouts[group[0]].prompt_id,
                len(group),
                limit,
            )
        for start in range(0, len(group), limit):
            piece = group[start : start + limit]
            if len(current) + len(piece) > limit:
                chunks.append(current)
                current = []
            current.extend(piece)
    if current:
        chunks.append(current)
    return [
        ScoreChunk(
            positions,
            [rollouts[i].rollout_id for i in positions],
            codec.encode([rollouts[i] for i in positions], step),
            codec,
        )
        for positions in chunks
    ]


def unsendable_rows(rollouts: Sequence[Rollout]) -> tuple[list[int], str]:
    """Positions of the rollouts whose fingerprint or reward cannot be sent, and why; every rollout when
    the fingerprints disagree on their dimension (which one is wrong cannot be told). Called only when
    encoding a batch failed, so it may look at rollouts one by one."""
    bad: list[int] = []
    dims: set[int] = set()
    for position, rollout in enumerate(rollouts):
        if rollout.reward is not None and not math.isfinite(float(rollout.reward)):
            bad.append(position)
        elif rollout.fingerprint is not None:
            try:
                vector = np.asarray(rollout.fingerprint, dtype=np.float64)
            except (TypeError, ValueError):
                bad.append(position)
                continue
            if vector.ndim != 1 or vector.size == 0 or not _sendable_floats(vector):
                bad.append(position)
            else:
                dims.add(vector.shape[0])
    if len(dims) > 1:
        return list(range(len(rollouts))), f"fingerprints of different dimensions {sorted(dims)} in one batch"
    return bad, "NaN, infinite or float32-overflowing fingerprints or rewards, or fingerprints that are not 1-D"


def _sendable_floats(vector: npt.NDArray[np.float64]) -> bool:
    return bool(np.isfinite(vector).all() and (np.abs(vector) <= np.finfo(np.float32).max).all())


def encode_score_columns(rollouts: Sequence[Rollout], step: int | None) -> bytes:
    """The compact columnar msgpack body of one score request (the service's `application/msgpack` form):
    one entry per rollout in each column, fingerprints as one float32 matrix, no per-rollout objects."""
    assert msgpack is not None
    present = [i for i, r in enumerate(rollouts) if r.fingerprint is not None]
    matrix = _fingerprint_matrix(rollouts, present)
    rewards = np.array([np.nan if r.reward is None else float(r.reward) for r in rollouts], dtype="<f8")
    if np.isinf(rewards).any():
        raise ValueError(f"reward of rollout {rollouts[int(np.argmax(np.isinf(rewards)))].rollout_id!r} is not finite")
    mask = np.zeros(len(rollouts), dtype=np.uint8)
    mask[present] = 1
    body: dict[str, Any] = {
        "rollout_id": [r.rollout_id for r in rollouts],
        "prompt_id": [r.prompt_id for r in rollouts],
        "correct": np.array([-1 if r.correct is None else int(bool(r.correct)) for r in rollouts], "<i1").tobytes(),
        "reward": rewards.tobytes(),
    }
    if present:
        body["fingerprint_present"] = mask.tobytes()
        body["fingerprints"] = {"dtype": "float32", "shape": list(matrix.shape),
                                "data": np.ascontiguousarray(matrix, dtype="<f4").tobytes()}  # fmt: skip
    if step is not None:
        body["step"] = int(step)
    if any(r.text is not None for r in rollouts):
        body["text"] = [r.text for r in rollouts]
    return bytes(msgpack.packb(body))


def encode_score_body(rollouts: Sequence[Rollout], step: int | None) -> dict[str, Any]:
    """The JSON body of one score request.

    If any fingerprint is a numpy array, all fingerprints go into one float32 `fingerprint_matrix`
    (base64 of little-endian row-major bytes) and rollouts point at their row; otherwise they are sent
    as JSON lists.
    """
    body: dict[str, Any] = {"rollouts": [_rollout_json(r) for r in rollouts]}
    if step is not None:
        body["step"] = int(step)
    present = [i for i, r in enumerate(rollouts) if r.fingerprint is not None]
    matrix = _fingerprint_matrix(rollouts, present)
    if any(isinstance(r.fingerprint, np.ndarray) for r in rollouts):
        body["fingerprint_matrix"] = encode_matrix(matrix)
        rows = dict(zip(present, range(len(present)), strict=True))
        for i, item in enumerate(body["rollouts"]):
            item["fingerprint_row"] = rows.get(i)
    else:
        lists = dict(zip(present, matrix.tolist(), strict=True))
        for i, item in enumerate(body["rollouts"]):
            item["fingerprint"] = lists.get(i)
    return body


def encode_matrix(matrix: npt.NDArray[np.float32]) -> dict[str, Any]:
    """The compact wire form of a float32 matrix."""
    data = np.ascontiguousarray(matrix, dtype="<f4")
    return {
        "dtype": "float32",
        "shape": list(data.shape),
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }


def _fingerprint_matrix(rollouts: Sequence[Rollout], present: list[int]) -> npt.NDArray[np.float32]:
    """The fingerprints of `present` rollouts as one float32 matrix, checked once for the whole batch."""
    raw = [rollouts[i].fingerprint for i in present]
    # float32 arrays (what fingerprint extraction returns) stack as they are; anything else via float64,
    # so that values beyond float32's range are caught before they would turn into infinities.
    exact = all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in raw)
    vectors = [np.asarray(v, dtype=np.float32 if exact else np.float64) for v in raw]
    if any(v.ndim != 1 or v.size == 0 for v in vectors):
        i = next(i for i, v in zip(present, vectors, strict=True) if v.ndim != 1 or v.size == 0)
        raise ValueError(f"fingerprint of rollout {rollouts[i].rollout_id!r} must be a non-empty 1-D vector")
    dims = {v.shape[0] for v in vectors}
    if len(dims) > 1:
        raise ValueError(f"fingerprints in one batch must have one dimension, got {sorted(dims)}")
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32)
    matrix = np.stack(vectors)
    bad = ~np.isfinite(matrix).all(axis=1) | (np.abs(matrix) > np.finfo(np.float32).max).any(axis=1)
    if bad.any():
        rollout_id = rollouts[present[int(np.argmax(bad))]].rollout_id
        raise ValueError(f"fingerprint of rollout {rollout_id!r} has NaN, inf or float32-overflowing values")
    return matrix.astype(np.float32)


def _rollout_json(rollout: Rollout) -> dict[str, Any]:
    reward = None if rollout.reward is None else float(rollout.reward)
    if reward is not None and not math.isfinite(reward):
        raise ValueError(f"reward of rollout {rollout.rollout_id!r} is not finite")
    correct = None if rollout.correct is None else bool(rollout.correct)
    item = {"rollout_id": rollout.rollout_id, "prompt_id": rollout.prompt_id, "correct": correct, "reward": reward}
    if rollout.text is not None:
        item["text"] = rollout.text
    return item


def _positions_by_prompt(rollouts: Sequence[Rollout]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for position, rollout in enumerate(rollouts):
        groups.setdefault(rollout.prompt_id, []).append(position)
    return list(groups.values())


def _estimated_bytes_per_rollout(rollouts: Sequence[Rollout]) -> int:
    dim = max((len(r.fingerprint) for r in rollouts if r.fingerprint is not None), default=0)
    binary = any(isinstance(r.fingerprint, np.ndarray) for r in rollouts)
    per_float = _BINARY_BYTES_PER_FLOAT if binary else _JSON_BYTES_PER_FLOAT
    ids = max((len(r.rollout_id) + len(r.prompt_id) for r in rollouts), default=0)
    return _FIXED_BYTES_PER_ROLLOUT + 2 * ids + dim * per_float


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LENGTH:
        raise ValueError(f"{name} must be a string of 1 to {MAX_ID_LENGTH} characters, got {value!r}")


def unpack_columns(content: bytes) -> ScoreResults:
    """Parse the service's `application/msgpack` score answer; ValueError when it is malformed."""
    if msgpack is None:  # pragma: no cover - only asked for when msgpack is installed
        raise ValueError("msgpack is not installed")
    try:
        wire = msgpack.unpackb(content, raw=False)
        ids = list(wire["rollout_id"])
        status = np.frombuffer(wire["status"], "<i1").astype(np.int8)
        cluster = np.frombuffer(wire["cluster"], "<i4").astype(np.int64)
        size = np.frombuffer(wire["cluster_size"], "<i4").astype(np.int64)
        penalty = np.frombuffer(wire["penalty"], "<f8").astype(np.float64)
        shaped = np.frombuffer(wire["shaped_reward"], "<f8").astype(np.float64)
    except (KeyError, TypeError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    lengths = {len(ids), len(status), len(cluster), len(size), len(penalty), len(shaped)}
    if len(lengths) != 1 or not all(isinstance(i, str) for i in ids):
        raise ValueError("columns of different lengths or ids that are not strings")
    if ((status < 0) | (status > 2)).any():
        raise ValueError("unknown status codes")
    return ScoreResults(ids, status, cluster, size, penalty, shaped).add_metrics(
        wire.get("metrics"), wire.get("metric_counts")
    )
