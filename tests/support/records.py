"""Test helpers for stored records."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from meds_service.core.types import RESULT_DTYPE, RolloutResult


def result_records(results: Sequence[RolloutResult]) -> NDArray[np.void]:
    """RESULT_DTYPE records of results (the inverse of RolloutResult.from_record)."""
    return np.array([r.record() for r in results], dtype=RESULT_DTYPE)
