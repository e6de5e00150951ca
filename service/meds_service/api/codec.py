"""Decoding score requests into columns, with every check that keeps bad input out of memory."""

from __future__ import annotations

import base64
import binascii

import numpy as np
from pydantic import ValidationError

from ..core.errors import InvalidInput
from ..core.types import Group, RolloutBatch
from .schemas import FingerprintMatrix, ScoreRequest

F32_MAX = float(np.finfo(np.float32).max)


class SchemaError(InvalidInput):
    """The body does not match the request schema (answered with 422)."""


def describe(error: ValidationError, limit: int = 5) -> str:
    """A short message from pydantic errors that never echoes input values (NaN would break JSON)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_score_request(body: bytes, *, max_batch: int, max_dim: int) -> tuple[RolloutBatch, int | None]:
    """Parse and validate a score request body; returns the columns and the step."""
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors(include_url=False, include_input=False)):
            raise InvalidInput("body is not valid JSON") from None
        raise SchemaError(describe(exc)) from None
    rollouts = request.rollouts
    if not rollouts:
        raise InvalidInput("rollouts is empty")
    if len(rollouts) > max_batch:
        raise InvalidInput(f"{len(rollouts)} rollouts in one request is over the limit of {max_batch}")
    ids = [r["rollout_id"] for r in rollouts]
    if len(set(ids)) != len(ids):
        raise InvalidInput("rollout_id values repeat within the request")
    fingerprints, present = _fingerprints(request, max_dim)
    rewards = np.array([_or_nan(r.get("reward")) for r in rollouts], dtype=np.float64)
    groups = np.array([Group.of(r.get("correct")) for r in rollouts], dtype=np.int64)
    batch = RolloutBatch(ids, [r["prompt_id"] for r in rollouts], groups, rewards, fingerprints, present)
    return batch, request.step


def _fingerprints(request: ScoreRequest, max_dim: int) -> tuple[np.ndarray, np.ndarray]:
    rollouts = request.rollouts
    matrix = _matrix(request.fingerprint_matrix, max_dim) if request.fingerprint_matrix else None
    lists = [i for i, r in enumerate(rollouts) if r.get("fingerprint") is not None]
    rows = [i for i, r in enumerate(rollouts) if r.get("fingerprint_row") is not None]
    if any(rollouts[i].get("fingerprint") is not None for i in rows):
        raise InvalidInput("a rollout has both fingerprint and fingerprint_row")
    if rows and matrix is None:
        raise InvalidInput("fingerprint_row given without fingerprint_matrix")
    dims = {len(rollouts[i].get("fingerprint") or ()) for i in lists}
    if matrix is not None and rows:
        dims.add(matrix.shape[1])
    if len(dims) > 1:
        raise InvalidInput(f"fingerprints of different lengths in one request: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    if dim == 0 and (lists or rows):
        raise InvalidInput("a fingerprint has no values")
    if dim > max_dim:
        raise InvalidInput(f"fingerprints have {dim} values, over the limit of {max_dim}")
    out = np.zeros((len(rollouts), dim), dtype=np.float32)
    present = np.zeros(len(rollouts), dtype=bool)
    if lists:
        values = np.array([rollouts[i].get("fingerprint") for i in lists], dtype=np.float64)
        out[lists] = _as_float32(values, "fingerprint")
        present[lists] = True
    if rows:
        assert matrix is not None
        picks = np.array([rollouts[i].get("fingerprint_row") for i in rows], dtype=np.int64)
        if picks.max() >= len(matrix):
            raise InvalidInput(f"fingerprint_row {int(picks.max())} is outside fingerprint_matrix")
        out[rows] = matrix[picks]
        present[rows] = True
    return out, present


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value


def _matrix(spec: FingerprintMatrix, max_dim: int) -> np.ndarray:
    rows, dim = spec.shape
    if dim > max_dim:
        raise InvalidInput(f"fingerprint_matrix has {dim} columns, over the limit of {max_dim}")
    try:
        raw = base64.b64decode(spec.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("fingerprint_matrix.data is not valid base64") from None
    if len(raw) != rows * dim * 4:
        raise InvalidInput(f"fingerprint_matrix.data has {len(raw)} bytes; shape {spec.shape} needs {rows * dim * 4}")
    matrix = np.frombuffer(raw, dtype="<f4").reshape(rows, dim).astype(np.float32)
    if not np.isfinite(matrix).all():
        raise InvalidInput("fingerprint_matrix holds NaN or infinite values")
    return matrix


def _as_float32(values: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InvalidInput(f"{what} values must be finite numbers")
    if (np.abs(values) > F32_MAX).any():
        raise InvalidInput(f"{what} values must fit in float32 (|x| <= {F32_MAX:.7g})")
    return values.astype(np.float32)
