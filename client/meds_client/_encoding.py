"""Turning rollouts into score requests: validation, compact fingerprints, chunking by prompt, and the
wire codecs (`WIRE_CODECS`) that encode a chunk and read the answer in one wire format each."""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import uuid
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

    def encode(self, columns: RolloutColumns, step: int | None) -> bytes:
        """The body of one score request (the columns were checked when they were built)."""
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

    def encode(self, columns: RolloutColumns, step: int | None) -> bytes:
        return _json.dumps(json_body(columns, step), checked=True)

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

    def encode(self, columns: RolloutColumns, step: int | None) -> bytes:
        return pack_columns(columns, step)

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
    """One score request: the rollouts it carries, where they sit in the caller's batch, and its body in
    the wire format of `codec` (both None for rollouts that are not sent)."""

    positions: list[int]
    rollout_ids: list[str]
    content: bytes | None = None
    codec: WireCodec | None = None


@dataclass(frozen=True)
class RolloutColumns:
    """A batch as columns, the one form the codecs encode: `score` builds it once from `Rollout`s, and
    `score_columns` takes the caller's arrays as they are (no object per rollout on the way)."""

    rollout_ids: list[str]
    prompt_ids: list[str]
    correct: npt.NDArray[np.int8]
    """1 correct, 0 wrong, -1 unknown."""
    rewards: npt.NDArray[np.float64]
    """NaN where there is no reward."""
    fingerprints: npt.NDArray[np.float32]
    """One row per rollout that has a fingerprint (`present`), in batch order."""
    present: npt.NDArray[np.bool_]
    texts: list[str | None] | None = None
    as_lists: bool = False
    """Send fingerprints as JSON lists (the caller gave lists) rather than one base64 matrix."""

    def __len__(self) -> int:
        return len(self.rollout_ids)

    def take(self, positions: Sequence[int]) -> RolloutColumns:
        """The rollouts at `positions`, in that order."""
        index = np.asarray(positions, dtype=np.intp)
        rows = (np.cumsum(self.present) - 1)[index[self.present[index]]]
        return RolloutColumns(
            [self.rollout_ids[i] for i in positions],
            [self.prompt_ids[i] for i in positions],
            self.correct[index],
            self.rewards[index],
            self.fingerprints[rows],
            self.present[index],
            None if self.texts is None else [self.texts[i] for i in positions],
            self.as_lists,
        )

    def unsendable(self) -> npt.NDArray[np.bool_]:
        """Which rollouts carry an infinite reward or a fingerprint with NaN or infinite values."""
        bad = np.isinf(self.rewards)
        bad[self.present] |= ~np.isfinite(self.fingerprints).all(axis=1)
        return bad


def coerce_rollouts(rollouts: Iterable[Rollout | Mapping[str, Any]]) -> list[Rollout]:
    """Accept `Rollout`s or plain dicts with the same keys; check what the service would reject anyway."""
    coerced = [item if isinstance(item, Rollout) else Rollout(**item) for item in rollouts]
    check_ids([r.rollout_id for r in coerced], [r.prompt_id for r in coerced])
    return coerced


def check_ids(rollout_ids: Sequence[Any], prompt_ids: Sequence[Any]) -> None:
    """ValueError unless both are strings of 1 to MAX_ID_LENGTH characters and rollout ids do not repeat."""
    for name, values in (("rollout_id", rollout_ids), ("prompt_id", prompt_ids)):
        # Whole-column checks in C loops (a set of the values' types, min and max of their lengths).
        if set(map(type, values)) - {str} or (
            values and not 1 <= min(map(len, values)) <= max(map(len, values)) <= MAX_ID_LENGTH
        ):
            for value in values:  # say which one
                _check_id(name, value)
    if len(set(rollout_ids)) != len(rollout_ids):
        seen: set[str] = set()
        repeated = next(i for i in rollout_ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"rollout_id {repeated!r} appears twice in one batch")


def columns_of(rollouts: Sequence[Rollout]) -> RolloutColumns:
    """The columns of `Rollout`s; ValueError when one cannot be sent (see `unsendable_rows`)."""
    present = [i for i, r in enumerate(rollouts) if r.fingerprint is not None]
    matrix = _fingerprint_matrix(rollouts, present)
    rewards = np.array([np.nan if r.reward is None else float(r.reward) for r in rollouts], dtype=np.float64)
    given = np.array([r.reward is not None for r in rollouts], dtype=bool)
    if (given & ~np.isfinite(rewards)).any():
        raise ValueError(f"reward of rollout {rollouts[int(np.argmax(given & ~np.isfinite(rewards)))].rollout_id!r} "
                         "is not finite")  # fmt: skip
    mask = np.zeros(len(rollouts), dtype=bool)
    mask[present] = True
    texts = [r.text for r in rollouts]
    return RolloutColumns(
        [r.rollout_id for r in rollouts],
        [r.prompt_id for r in rollouts],
        np.array([-1 if r.correct is None else int(bool(r.correct)) for r in rollouts], dtype=np.int8),
        rewards,
        matrix,
        mask,
        texts if any(t is not None for t in texts) else None,
        as_lists=not any(isinstance(r.fingerprint, np.ndarray) for r in rollouts),
    )


def columns_from_arrays(
    prompt_ids: Sequence[str],
    *,
    rollout_ids: Sequence[str] | None = None,
    correct: Any = None,
    fingerprints: Any = None,
    rewards: Any = None,
    texts: Sequence[str | None] | None = None,
) -> RolloutColumns:
    """The columns a caller gives to `score_columns`, checked for shape and type (ValueError); values that
    cannot be sent (NaN fingerprints, infinite rewards) are left for `RolloutColumns.unsendable`."""
    prompts = list(prompt_ids)
    n = len(prompts)
    batch = uuid.uuid4().hex  # generated ids: unique in the run, so never answered as another's duplicate
    ids = [f"{batch}-{i}" for i in range(n)] if rollout_ids is None else list(rollout_ids)
    if len(ids) != n:
        raise ValueError(f"rollout_ids has {len(ids)} entries for {n} prompt_ids")
    check_ids(ids, prompts)
    matrix = np.zeros((0, 0), dtype=np.float32) if fingerprints is None else _matrix_column(fingerprints, n)
    given_texts = None if texts is None else list(texts)
    if given_texts is not None and (len(given_texts) != n or not all(t is None or type(t) is str for t in given_texts)):
        raise ValueError(f"texts must be {n} strings or None")
    return RolloutColumns(
        ids,
        prompts,
        _correct_column(correct, n),
        _vector_column(rewards, n, "rewards"),
        matrix,
        np.full(n, fingerprints is not None, dtype=bool),
        given_texts if given_texts is not None and any(t is not None for t in given_texts) else None,
    )


def _correct_column(correct: Any, n: int) -> npt.NDArray[np.int8]:
    """1 / 0 / -1 (unknown) from booleans, from integers 1 / 0 / -1, or from a sequence of bool or None."""
    if correct is None:
        return np.full(n, -1, dtype=np.int8)
    values = np.asarray(correct)
    if values.dtype == object:
        values = np.array([-1 if c is None else int(bool(c)) for c in values.tolist()], dtype=np.int8)
    if values.shape != (n,) or not (values.dtype == bool or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"correct must be {n} booleans (or 1, 0, -1 = unknown), got shape {values.shape}")
    if values.dtype != bool and not np.isin(values, (-1, 0, 1)).all():
        raise ValueError("correct holds integers other than 1, 0 and -1 (unknown)")
    return values.astype(np.int8)


def _vector_column(values: Any, n: int, name: str) -> npt.NDArray[np.float64]:
    if values is None:
        return np.full(n, np.nan)
    column = np.asarray(values, dtype=np.float64)
    if column.shape != (n,):
        raise ValueError(f"{name} must be {n} numbers (NaN = none), got shape {column.shape}")
    return column


def _matrix_column(fingerprints: Any, n: int) -> npt.NDArray[np.float32]:
    """A [n, dim] float32 matrix; rows beyond float32's range become infinite, which `unsendable` finds."""
    matrix = np.asarray(fingerprints)
    if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] == 0:
        raise ValueError(f"fingerprints must be a 2-D array of {n} non-empty rows, got shape {matrix.shape}")
    if matrix.dtype != np.float32:
        wide = matrix.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            matrix = np.where(np.abs(wide) > np.finfo(np.float32).max, np.inf, wide).astype(np.float32)
    return matrix


def plan_chunks(
    columns: RolloutColumns, *, max_rollouts: int, max_bytes: int, step: int | None, codec: WireCodec = JSON_WIRE
) -> list[ScoreChunk]:
    """Split a batch into requests without splitting a prompt's rollouts when it can be avoided.

    Rollouts of one batch must not see each other (docs/architecture.md, "The algorithm", step 3); keys
    are per prompt, so keeping each prompt's rollouts in one request keeps that true even when the batch
    needs several requests. A batch that fits in one request is sent as it is, in the caller's order.
    Only a single prompt with more rollouts than fit in a request is split (with a warning).
    """
    limit = max(1, min(max_rollouts, max_bytes // _estimated_bytes_per_rollout(columns)))
    if not len(columns):
        return []
    if len(columns) <= limit:
        return [ScoreChunk(list(range(len(columns))), columns.rollout_ids, codec.encode(columns, step), codec)]
    chunks: list[list[int]] = []
    current: list[int] = []
    for group in _positions_by_prompt(columns.prompt_ids):
        if len(group) > limit:
            logger.warning(
                "prompt %r has %d rollouts in one batch, more than one request holds (%d); splitting it",
                columns.prompt_ids[group[0]],
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
    parts = [(positions, columns.take(positions)) for positions in chunks]
    return [ScoreChunk(positions, part.rollout_ids, codec.encode(part, step), codec) for positions, part in parts]


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


def pack_columns(columns: RolloutColumns, step: int | None) -> bytes:
    """The compact columnar msgpack body of one score request (the service's `application/msgpack` form):
    one entry per rollout in each column, fingerprints as one float32 matrix, no per-rollout objects."""
    assert msgpack is not None
    body: dict[str, Any] = {
        "rollout_id": columns.rollout_ids,
        "prompt_id": columns.prompt_ids,
        "correct": columns.correct.astype("<i1").tobytes(),
        "reward": columns.rewards.astype("<f8").tobytes(),
    }
    if columns.present.any():
        body["fingerprint_present"] = columns.present.astype(np.uint8).tobytes()
        matrix = np.ascontiguousarray(columns.fingerprints, dtype="<f4")
        body["fingerprints"] = {"dtype": "float32", "shape": list(matrix.shape), "data": matrix.tobytes()}
    if step is not None:
        body["step"] = int(step)
    if columns.texts is not None:
        body["text"] = columns.texts
    return bytes(msgpack.packb(body))


def json_body(columns: RolloutColumns, step: int | None) -> dict[str, Any]:
    """The JSON body of one score request.

    Fingerprints go as JSON lists when the caller gave lists (`as_lists`), otherwise as one float32
    `fingerprint_matrix` (base64 of little-endian row-major bytes) that rollouts point into by row.
    """
    correct = [None if c < 0 else bool(c) for c in columns.correct.tolist()]
    rewards = [None if math.isnan(x) else x for x in columns.rewards.tolist()]
    items = [
        {"rollout_id": rid, "prompt_id": pid, "correct": c, "reward": w}
        for rid, pid, c, w in zip(columns.rollout_ids, columns.prompt_ids, correct, rewards, strict=True)
    ]
    for item, text in zip(items, columns.texts or (), strict=False):
        if text is not None:
            item["text"] = text
    body: dict[str, Any] = {"rollouts": items}
    if step is not None:
        body["step"] = int(step)
    rows = iter(_json.fast_rows(columns.fingerprints) if columns.as_lists else range(len(columns.fingerprints)))
    field = "fingerprint" if columns.as_lists else "fingerprint_row"
    for item, present in zip(items, columns.present.tolist(), strict=True):
        item[field] = next(rows) if present else None
    if not columns.as_lists:
        body["fingerprint_matrix"] = encode_matrix(columns.fingerprints)
    return body


def encode_score_columns(rollouts: Sequence[Rollout], step: int | None) -> bytes:
    """The msgpack body of one score request of these rollouts."""
    return pack_columns(columns_of(rollouts), step)


def encode_score_body(rollouts: Sequence[Rollout], step: int | None) -> dict[str, Any]:
    """The JSON body of one score request of these rollouts."""
    return json_body(columns_of(rollouts), step)


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
    if not exact and raw and set(map(type, raw)) == {list}:
        # Lists of one length stack in one C loop; ragged or odd ones fall through to the checks below.
        with contextlib.suppress(ValueError, TypeError):
            stacked = np.array(raw, dtype=np.float64)
            if stacked.ndim == 2 and stacked.shape[1] > 0:
                return _checked_matrix(stacked, rollouts, present)
    vectors = [np.asarray(v, dtype=np.float32 if exact else np.float64) for v in raw]
    if any(v.ndim != 1 or v.size == 0 for v in vectors):
        i = next(i for i, v in zip(present, vectors, strict=True) if v.ndim != 1 or v.size == 0)
        raise ValueError(f"fingerprint of rollout {rollouts[i].rollout_id!r} must be a non-empty 1-D vector")
    dims = {v.shape[0] for v in vectors}
    if len(dims) > 1:
        raise ValueError(f"fingerprints in one batch must have one dimension, got {sorted(dims)}")
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32)
    return _checked_matrix(np.stack(vectors), rollouts, present)


def _checked_matrix(
    matrix: npt.NDArray[np.floating[Any]], rollouts: Sequence[Rollout], present: list[int]
) -> npt.NDArray[np.float32]:
    bad = ~np.isfinite(matrix).all(axis=1) | (np.abs(matrix) > np.finfo(np.float32).max).any(axis=1)
    if bad.any():
        rollout_id = rollouts[present[int(np.argmax(bad))]].rollout_id
        raise ValueError(f"fingerprint of rollout {rollout_id!r} has NaN, inf or float32-overflowing values")
    return matrix.astype(np.float32)


def _positions_by_prompt(prompt_ids: Sequence[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for position, prompt_id in enumerate(prompt_ids):
        groups.setdefault(prompt_id, []).append(position)
    return list(groups.values())


def _estimated_bytes_per_rollout(columns: RolloutColumns) -> int:
    dim = columns.fingerprints.shape[1] if columns.fingerprints.ndim == 2 else 0
    per_float = _JSON_BYTES_PER_FLOAT if columns.as_lists else _BINARY_BYTES_PER_FLOAT
    ids = max(map(len, columns.rollout_ids), default=0) + max(map(len, columns.prompt_ids), default=0)
    text = max((len(t) for t in columns.texts or () if t is not None), default=0)
    return _FIXED_BYTES_PER_ROLLOUT + 2 * ids + dim * per_float + text


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
    if len(lengths) != 1 or set(map(type, ids)) - {str}:
        raise ValueError("columns of different lengths or ids that are not strings")
    if ((status < 0) | (status > 2)).any():
        raise ValueError("unknown status codes")
    return ScoreResults(ids, status, cluster, size, penalty, shaped).add_metrics(
        wire.get("metrics"), wire.get("metric_counts")
    )
