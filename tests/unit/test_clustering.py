"""Refit labels are identical to the public hdbscan estimator the reference uses, ties and duplicates included."""

from __future__ import annotations

import warnings

import hdbscan
import numpy as np
import pytest
from sklearn.preprocessing import normalize

from meds_service.core.clustering import cluster_sizes, fit_labels
from meds_service.core.config import RunConfig
from meds_service.core.preprocess import features, unit_rows


def reference_labels(stored: np.ndarray, config: RunConfig) -> np.ndarray:
    x = features(stored, config.layer_diff)
    if len(x) < 2:
        return np.full(len(x), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hdbscan.HDBSCAN(
            min_cluster_size=config.min_cluster_size,
            min_samples=config.min_samples,
            metric="euclidean",
            cluster_selection_method=config.cluster_selection_method,
            cluster_selection_epsilon=config.cluster_selection_epsilon,
        )
        return model.fit_predict(normalize(x, norm="l2"))


def varied_set(rng: np.random.Generator, case: int) -> np.ndarray:
    """Random sets of many shapes: blobs, grids with exact ties, duplicates, tiny sets, high dims, scales."""
    n = int(rng.choice([2, 3, 4, 5, 8, 16, 33, 64, 150]))
    dim = int(rng.choice([1, 2, 3, 14, 14, 14, 32, 61, 90]))
    kind = case % 5
    if kind == 0:  # blobs
        centres = rng.standard_normal((rng.integers(1, 5), dim)) * 4
        x = centres[rng.integers(len(centres), size=n)] + rng.standard_normal((n, dim)) * rng.uniform(0.01, 1)
    elif kind == 1:  # integer grid: many exactly equal distances
        x = rng.integers(-2, 3, size=(n, dim)).astype(float)
    elif kind == 2:  # exact duplicates of a few points, some scaled (same direction = same cosine)
        base = rng.standard_normal((max(1, n // 4), dim))
        x = base[rng.integers(len(base), size=n)] * rng.choice([1.0, 2.0, 0.5], size=(n, 1))
    elif kind == 3:  # symmetric configurations: +/- unit axes
        axes = np.eye(dim)[rng.integers(dim, size=n)] * rng.choice([-1.0, 1.0], size=(n, 1))
        x = axes + (rng.random((n, 1)) < 0.3) * 0.5
    else:  # wide dynamic range, zero rows included
        x = rng.standard_normal((n, dim)) * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
        x[rng.random(n) < 0.1] = 0.0
    return x.astype(np.float32)


def test_unit_rows_is_bitwise_sklearn_normalize() -> None:
    rng = np.random.default_rng(1)
    for case in range(300):
        x = varied_set(rng, case).astype(np.float64)
        assert np.array_equal(unit_rows(x), normalize(x, norm="l2"))


def test_labels_identical_to_reference_on_1200_varied_sets() -> None:
    rng = np.random.default_rng(2026)
    config = RunConfig()
    differing = [
        case
        for case in range(1200)
        if not np.array_equal(fit_labels(s := varied_set(rng, case), config), reference_labels(s, config))
    ]
    assert differing == []


@pytest.mark.parametrize(
    "config",
    [
        RunConfig(min_cluster_size=3, min_samples=2),
        RunConfig(cluster_selection_method="leaf"),
        RunConfig(cluster_selection_epsilon=0.1),
        RunConfig(layer_diff=True, dim=15),
    ],
)
def test_labels_identical_for_other_cluster_parameters(config: RunConfig) -> None:
    rng = np.random.default_rng(5)
    for case in range(200):
        stored = varied_set(rng, case)
        if config.layer_diff and stored.shape[1] < 2:
            continue
        assert np.array_equal(fit_labels(stored, config), reference_labels(stored, config)), case


def test_fewer_than_two_vectors_are_noise() -> None:
    config = RunConfig()
    assert fit_labels(np.zeros((0, 4), np.float32), config).tolist() == []
    assert fit_labels(np.ones((1, 4), np.float32), config).tolist() == [-1]


def test_cluster_sizes_counts_noise_at_index_zero() -> None:
    sizes = cluster_sizes(np.array([-1, 0, 0, 2, -1, 0]))
    assert sizes.tolist() == [2, 3, 0, 1]
    assert cluster_sizes(np.zeros(0, np.int64)).tolist() == [0]
