"""JSON for the wire: orjson when it is installed (several times faster on large batches), else the stdlib."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

try:  # an optional speed-up, not a dependency
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None  # type: ignore[assignment]


def dumps(body: Any, *, checked: bool = False) -> bytes:
    """Encode a request body. `checked` bodies hold only finite numbers (the score encoder verified them);
    others go through the stdlib with allow_nan=False, which refuses NaN where orjson would write null.
    orjson writes numpy float32 arrays in float32's shortest form (`fast_rows`), which parses back to the
    same float32 values in half the bytes of their float64 form."""
    if checked and orjson is not None:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")


def loads(content: bytes) -> Any:
    if orjson is not None:
        return orjson.loads(content)
    return json.loads(content)


def fast_rows(matrix: npt.NDArray[np.float32]) -> list[Any]:
    """A float32 matrix's rows for a `checked` body: numpy rows where orjson writes them, else Python lists."""
    return list(matrix) if orjson is not None else matrix.tolist()
