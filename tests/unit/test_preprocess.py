"""Stored vectors and features reproduce the reference's float64 preprocessing exactly."""

from __future__ import annotations

import numpy as np
import pytest

from meds_service.core.config import RunConfig
from meds_service.core.preprocess import features, stored_vectors


def reference_vector(fp: np.ndarray, layer_diff: bool, last_n: int | None) -> np.ndarray:
    vec = np.array(fp.tolist(), dtype=float)
    if layer_diff:
        vec = np.diff(vec)
    if last_n is not None and len(vec) >= last_n:
        vec = vec[-last_n:]
    return vec


@pytest.mark.parametrize("layer_diff", [False, True])
@pytest.mark.parametrize("last_n", [None, 1, 5, 14, 27])  # a run refuses fingerprints shorter than last_n
def test_features_equal_reference(layer_diff: bool, last_n: int | None) -> None:
    rng = np.random.default_rng(0)
    fps = (rng.standard_normal((20, 28)) * 50).astype(np.float32)
    config = RunConfig(dim=28, layer_diff=layer_diff, last_n_layers=last_n)
    stored = stored_vectors(fps, config)
    assert stored.dtype == np.float32 and stored.flags.c_contiguous
    got = features(stored, layer_diff)
    want = np.stack([reference_vector(fp, layer_diff, last_n) for fp in fps])
    assert got.dtype == np.float64
    assert np.array_equal(got, want)
