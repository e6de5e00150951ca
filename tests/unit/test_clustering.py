"""Refit labels are identical to the public hdbscan estimator the reference uses, ties and duplicates included."""

from __future__ import annotations

import warnings

import hdbscan
import numpy as np
import pytest
from hdbscan._hdbscan_linkage import label as package_single_linkage
from hdbscan._hdbscan_tree import compute_stability, get_clusters
from hdbscan._hdbscan_tree import condense_tree as package_condense_tree
from hdbscan.hdbscan_ import _hdbscan_boruvka_kdtree
from sklearn.neighbors import KDTree
from sklearn.preprocessing import normalize

from meds_service.core.clustering import (
    AnsweredQuery,
    condense_tree,
    eom_labels,
    fit_labels,
    nearest_neighbours,
    single_linkage,
    single_linkage_tree,
    skip_tree_input_checks,
    spanning_tree,
)
from meds_service.core.config import RunConfig
from meds_service.core.penalty import cluster_sizes
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


@pytest.mark.parametrize("min_cluster_size", [2, 3, 5])
def test_fewer_than_twice_min_cluster_size_is_all_noise_as_in_the_reference(min_cluster_size: int) -> None:
    """The shortcut that skips HDBSCAN below 2 * min_cluster_size vectors agrees with the estimator."""
    rng = np.random.default_rng(min_cluster_size)
    config = RunConfig(min_cluster_size=min_cluster_size)
    for case in range(100):
        n = int(rng.integers(2, 2 * min_cluster_size))
        stored = varied_set(rng, case)[:n]
        stored = stored if len(stored) == n else rng.standard_normal((n, 14)).astype(np.float32)
        assert fit_labels(stored, config).tolist() == [-1] * n
        assert reference_labels(stored, config).tolist() == [-1] * n, case


def fitted_rows(rng: np.random.Generator, case: int) -> tuple[np.ndarray, int]:
    """Normalised rows of a varied set of at least 4 points, and its min_samples as the estimator clamps it."""
    stored = varied_set(rng, case)
    while len(stored) < 4:
        stored = varied_set(rng, case + 1)
    return unit_rows(features(stored, False)), max(1, min(len(stored) - 1, int(rng.choice([1, 1, 2, 3]))))


def test_each_half_of_a_fit_is_bit_identical_to_the_package() -> None:
    """Spanning tree, single linkage and condensed tree equal the package's byte for byte, and the
    excess-of-mass labels equal its `get_clusters`, on varied sets (ties, duplicates, zero rows)."""
    rng = np.random.default_rng(11)
    for case in range(300):
        x, min_samples = fitted_rows(rng, case)
        min_cluster_size = int(rng.choice([2, 2, 3, 5]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want_hierarchy, want_edges = _hdbscan_boruvka_kdtree(
                x, min_samples, 1.0, "euclidean", None, 40, True, True, 4
            )
        edges = spanning_tree(x, min_samples)
        assert edges.tobytes() == want_edges.tobytes(), case
        hierarchy = single_linkage(edges)
        assert hierarchy.tobytes() == package_single_linkage(want_edges).tobytes(), case
        assert hierarchy.tobytes() == want_hierarchy.tobytes(), case
        condensed = condense_tree(hierarchy, min_cluster_size)
        assert condensed.tobytes() == package_condense_tree(want_hierarchy, min_cluster_size).tobytes(), case
        stability = compute_stability(condensed)
        want_labels = get_clusters(condensed, stability, "eom", False, False, 0.0, 0, float("inf"))[0]
        assert eom_labels(condensed, len(x)).tolist() == want_labels.tolist(), case


def blobs(rng: np.random.Generator, n: int, dim: int = 14) -> np.ndarray:
    """A key as the service holds it after many epochs: a few error modes, noise of three scales."""
    centres = rng.standard_normal((int(rng.integers(1, 6)), dim)) * 4
    x = centres[rng.integers(len(centres), size=n)]
    return (x + rng.standard_normal((n, dim)) * rng.choice([0.1, 0.5, 1.5], size=(n, 1))).astype(np.float32)


def test_nearest_neighbours_are_the_kd_trees_answer_bit_for_bit() -> None:
    """Where it answers, the Gram-matrix search returns exactly what the Boruvka's core-distance query
    returns (distances and indices, byte for byte); it declines ties, and answers untied sets of every size,
    across row blocks."""
    rng = np.random.default_rng(23)
    answered = declined = 0
    for case in range(700):
        stored = varied_set(rng, case) if case % 4 else blobs(rng, int(rng.integers(4, 1300)))
        x = unit_rows(features(stored, False))
        if len(x) < 2:
            continue
        got = nearest_neighbours(x)
        if got is None:
            declined += 1
            continue
        answered += 1
        want = KDTree(x, leaf_size=40).query(x, k=2, dualtree=True, breadth_first=True)
        assert got[0].tobytes() == want[0].tobytes(), case
        assert got[1].astype(want[1].dtype).tobytes() == want[1].tobytes(), case
    assert answered > 300 and declined > 50


def test_nearest_neighbours_decline_ties_and_duplicates() -> None:
    equidistant = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # every neighbour at sqrt(2)
    assert nearest_neighbours(equidistant) is None
    duplicated = unit_rows(features(blobs(np.random.default_rng(3), 50), False))
    duplicated[7] = duplicated[31]
    assert nearest_neighbours(duplicated) is None
    assert nearest_neighbours(np.zeros((5, 3))) is None
    single = nearest_neighbours(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    assert single is not None and single[1][:, 1].tolist() == [2, 2, 1]


def test_nearest_neighbours_resolve_near_ties_exactly() -> None:
    """Two neighbours at distances a few ulps apart: too close for the Gram distance to order them, so the
    exact distances decide (or the search declines when they are equal); the answer is still the tree's."""
    rng = np.random.default_rng(31)
    outcomes = {"answered": 0, "declined": 0}
    for case in range(300):
        x = rng.standard_normal((int(rng.integers(3, 40)), 5)) * 3
        direction = rng.standard_normal(5)
        step = rng.uniform(0.01, 0.1) * direction / np.linalg.norm(direction)
        x[1] = x[0] + step
        x[2] = x[0] - step * (1 + float(rng.integers(0, 4)) * np.finfo(np.float64).eps)
        got = nearest_neighbours(x)
        outcomes["declined" if got is None else "answered"] += 1
        if got is not None:
            want = KDTree(x, leaf_size=40).query(x, k=2, dualtree=True, breadth_first=True)
            assert got[0].tobytes() == want[0].tobytes(), case
            assert got[1].astype(want[1].dtype).tobytes() == want[1].tobytes(), case
    assert outcomes["answered"] > 30 and outcomes["declined"] > 30


def test_answered_query_only_answers_the_core_distance_query() -> None:
    x = np.eye(3)
    answer = (np.zeros((3, 2)), np.zeros((3, 2), dtype=np.intp))
    assert AnsweredQuery(x, answer).query(x, k=2, dualtree=True, breadth_first=True) is answer
    with pytest.raises(AssertionError):
        AnsweredQuery(x, answer).query(x, k=3)


def test_large_keys_spanning_trees_and_labels_match_the_package() -> None:
    """Keys of hundreds to thousands of vectors (100 epochs of 16 rollouts): the spanning tree is the
    package's byte for byte and the labels the estimator's, with and without planted duplicates."""
    rng = np.random.default_rng(29)
    config = RunConfig()
    for case in range(16):
        stored = blobs(rng, 6000 if case == 0 else int(rng.integers(200, 1600)))
        if case % 4 == 3:
            stored[rng.integers(len(stored), size=5)] = stored[0]
        x = unit_rows(features(stored, False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, want_edges = _hdbscan_boruvka_kdtree(x, 1, 1.0, "euclidean", None, 40, True, True, 4)
        assert spanning_tree(x, 1).tobytes() == want_edges.tobytes(), case
        assert np.array_equal(fit_labels(stored, config), reference_labels(stored, config)), case


def test_skipping_tree_input_checks_keeps_labels_and_checks_other_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn
    from sklearn.neighbors import KDTree, _kd_tree

    # Restored after the test; unwrapped first, as an earlier test in this process may have installed the skip.
    monkeypatch.setattr(_kd_tree, "check_array", getattr(_kd_tree.check_array, "__wrapped__", _kd_tree.check_array))
    original = _kd_tree.check_array
    with sklearn.config_context(assume_finite=True):
        skip_tree_input_checks()
        skip_tree_input_checks()  # idempotent: one wrapper
        fast = _kd_tree.check_array
        assert fast is not original and getattr(fast, "meds_fast_path", False)
        x = np.random.default_rng(3).standard_normal((20, 14))
        assert fast(x, dtype=np.float64, order="C") is x
        assert np.array_equal(fast(x.T, dtype=np.float64, order="C"), x.T)  # not C-ordered: converted
        with pytest.raises(ValueError):
            KDTree(np.zeros((0, 3)))  # empty input still refused by check_array
        rng = np.random.default_rng(19)
        config = RunConfig()
        for case in range(150):
            stored = varied_set(rng, case)
            assert np.array_equal(fit_labels(stored, config), reference_labels(stored, config)), case
    with pytest.raises(ValueError):
        fast(np.array([[np.nan, 1.0]]), dtype=np.float64, order="C")  # without assume_finite: checked


def test_prims_path_above_60_dimensions_matches_the_reference() -> None:
    rng = np.random.default_rng(13)
    config = RunConfig()
    for case in range(60):
        n, dim = int(rng.integers(4, 80)), int(rng.choice([61, 64, 384]))
        centres = rng.standard_normal((int(rng.integers(1, 4)), dim))
        stored = (centres[rng.integers(len(centres), size=n)] + 0.2 * rng.standard_normal((n, dim))).astype(np.float32)
        assert np.array_equal(fit_labels(stored, config), reference_labels(stored, config)), case
        assert single_linkage_tree(unit_rows(features(stored, False)), 1).shape == (n - 1, 4)


def test_stability_ties_and_float32_sums_decide_as_the_package() -> None:
    """Sets built so that a cluster and its children have equal or nearly equal stability (symmetric
    duplicates at a few distances) exercise the comparison the package makes in a C float."""
    rng = np.random.default_rng(17)
    config = RunConfig()
    differing = []
    for case in range(200):
        k = int(rng.integers(2, 6))
        base = np.eye(8)[:k] + rng.choice([0.0, 0.25, 0.5], size=(k, 8))
        copies = rng.integers(2, 6, size=k)
        x = np.repeat(base, copies, axis=0) * rng.choice([1.0, 3.0], size=(int(copies.sum()), 1))
        stored = x.astype(np.float32)
        if not np.array_equal(fit_labels(stored, config), reference_labels(stored, config)):
            differing.append(case)
    assert differing == []


def test_cluster_sizes_counts_noise_at_index_zero() -> None:
    sizes = cluster_sizes(np.array([-1, 0, 0, 2, -1, 0]))
    assert sizes.tolist() == [2, 3, 0, 1]
    assert cluster_sizes(np.zeros(0, np.int64)).tolist() == [0]
