"""Fingerprint preprocessing (docs/architecture.md, "The algorithm", step 2), split so that storage stays exact.

The reference computes features in float64 from float32 fingerprints: optional first differences, then the
last n values. A first difference of two float32 numbers is generally not a float32 number, so we store the
trailing *raw* float32 columns the features come from (`stored`) and derive the float64 features on use.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .config import RunConfig


def stored_vectors(fingerprints: NDArray[np.float32], config: RunConfig) -> NDArray[np.float32]:
    """The columns of `fingerprints` ([n, dim], float32) that a run keeps: a contiguous float32 copy."""
    return np.ascontiguousarray(fingerprints[:, fingerprints.shape[1] - config.stored_dim :])


def features(stored: NDArray[np.float32], layer_diff: bool) -> NDArray[np.float64]:
    """Float64 features of stored vectors, bit-identical to the reference's preprocessing."""
    as64 = stored.astype(np.float64)
    return np.diff(as64, axis=1) if layer_diff else as64


def unit_rows(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """L2-normalised rows, bit-identical to `sklearn.preprocessing.normalize(x)` used by the reference.

    Same arithmetic (einsum of squares, sqrt, near-zero norms replaced by 1) without its input validation,
    which costs more than the normalisation itself on the small per-prompt sets.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    return np.asarray(x / norms[:, None], dtype=np.float64)
