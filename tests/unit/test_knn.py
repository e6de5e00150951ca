"""The kNN vote and the proofs that float32 neighbour sets equal scikit-learn's, checked through the engine's
own prediction path."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.neighbors import NearestNeighbors

from meds_service.core import knn
from meds_service.core.config import RunConfig
from meds_service.core.penalty import NO_CLUSTER, cluster_sizes
from meds_service.core.preprocess import unit_rows
from meds_service.core.types import Group, MemoryKey
from meds_service.engine.assign import predict
from meds_service.engine.cache import CachedKey, Groups
from meds_service.storage.index import ShardIndex


def test_vote_most_frequent_ties_to_smallest() -> None:
    rows = np.array([[1, 2, 3], [2, 2, -1], [-1, 0, 0], [5, -1, 5], [3, 1, 1], [4, 4, 4], [0, -1, 7]])
    assert knn.vote(rows).tolist() == [1, 2, 0, 5, 1, 4, -1]


def test_vote_single_neighbour() -> None:
    assert knn.vote(np.array([[7], [-1]])).tolist() == [7, -1]


def test_certain_top_k() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.7], [0.9, 0.8, 0.7, 0.7 - 1e-9]], dtype=np.float32)
    bound = knn.float32_bound(14)
    k, searchable = np.full(3, 3), np.full(3, 10)
    assert knn.certain_top_k(scores, k, searchable, bound).tolist() == [True, False, False]
    # A row that wants every stored vector (fewer than the config's k) is certain whatever its scores.
    assert knn.certain_top_k(scores, np.array([3, 2, 3]), np.array([10, 2, 3]), bound).tolist() == [True, True, True]


def test_bounds_grow_with_dimension_and_stay_tiny() -> None:
    assert knn.float32_bound(14) < knn.float32_bound(4096) < 1e-3
    assert knn.float64_bound(14) < 1e-6
    assert knn.float32_bound(14, safety=8.0) > knn.float32_bound(14)


def test_band_vote_resolves_single_label_band_and_refuses_mixed() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    sims = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    # Top 3 = 0.9 plus two of three tied at 0.5 with labels {0, 1, 1}: mixed band -> undecidable here.
    assert knn.band_vote(sims, labels, 3, 1e-9) is None
    same = np.array([0, 1, 1, 1, 2])
    # The tie band holds only label 1: any choice votes 1.
    assert knn.band_vote(sims, same, 3, 1e-9) == 1
    assert knn.band_vote(np.array([0.9, 0.8]), np.array([4, -1]), 3, 1e-9) == -1


def sklearn_vote(history: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int) -> int:
    nn = NearestNeighbors(n_neighbors=min(k, len(history)), metric="cosine", algorithm="brute").fit(history)
    _, idx = nn.kneighbors(query.reshape(1, -1))
    values, counts = np.unique(labels[idx[0]], return_counts=True)
    return int(values[np.argmax(counts)])


def test_reference_vote_is_the_sklearn_computation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        history = rng.integers(-2, 3, size=(12, 3)).astype(np.float64)
        labels = rng.integers(-1, 3, size=12)
        query = rng.integers(-2, 3, size=3).astype(np.float64)
        assert knn.reference_vote(history, labels, query, 3) == sklearn_vote(history, labels, query, 3)


class Tiers:
    """An engine observer that remembers which tier decided the last vote."""

    def __init__(self) -> None:
        self.last = "float32"

    def knn_fallback(self, tier: str) -> None:
        self.last = tier

    def rollouts(self, status: str, count: int) -> None: ...
    def penalties(self, values: Any) -> None: ...
    def refit_done(self, keys: int, vectors: int, seconds: float) -> None: ...
    def refit_failed(self) -> None: ...


def engine_vote(history: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int) -> tuple[int, str]:
    """One query through the engine's own prediction path (engine/assign.py) on a real FAISS index."""
    key = MemoryKey("p", Group.WRONG)
    index = ShardIndex(history.shape[1], "cpu")
    index.append(key, unit_rows(history).astype(np.float32))
    n = len(history)
    cached = CachedKey(start=0, n=n, fit_start=0, fitted_upto=n, labels=labels, sizes=cluster_sizes(labels))
    tiers = Tiers()
    predicted, _ = predict(
        index,
        {key: cached},
        RunConfig(knn_k=k, dim=history.shape[1]),
        Groups([key], np.zeros(1, dtype=np.intp), [0, 1]),
        unit_rows(query[None, :]).astype(np.float32),
        query[None, :],
        lambda view: history[view.lo : view.hi],
        tiers,
    )
    return int(predicted[0]), tiers.last


@settings(max_examples=400, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=n, max_size=n),
            st.lists(st.integers(-1, 3), min_size=n, max_size=n),
            st.lists(st.integers(-2, 2), min_size=3, max_size=3),
            st.integers(1, 5),
        )
    )
)
def test_tiers_agree_with_sklearn_on_tie_heavy_grids(
    case: tuple[list[list[int]], list[int], list[int], int],
) -> None:
    history_l, labels_l, query_l, k = case
    history = np.array(history_l, dtype=np.float64)
    labels = np.array(labels_l, dtype=np.int64)
    query = np.array(query_l, dtype=np.float64)
    got, _tier = engine_vote(history, labels, query, k)
    assert got == sklearn_vote(history, labels, query, k)


def test_near_ties_closer_than_float32_rounding_are_decided_in_float64() -> None:
    """Two neighbours of different labels whose similarities differ by 5e-7: inside the float32 band (whose
    results show both labels), outside the float64 one."""
    history = np.array([[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    for query, expected in ((np.array([1.0, 0.0, 0.0]), 0), (np.array([1.0, 1.05e-3, 0.0]), 1)):
        got, tier = engine_vote(history, labels, query, 1)
        assert (got, tier) == (expected, "float64")
        assert got == sklearn_vote(history, labels, query, 1)


def test_tiers_agree_with_sklearn_on_random_data_mostly_in_float32() -> None:
    rng = np.random.default_rng(3)
    tiers = {"float32": 0, "float64": 0, "reference": 0}
    for _ in range(500):
        history = rng.standard_normal((rng.integers(1, 60), 14))
        labels = rng.integers(-1, 4, size=len(history))
        query = rng.standard_normal(14)
        got, tier = engine_vote(history, labels, query, 3)
        tiers[tier] += 1
        assert got == sklearn_vote(history, labels, query, 3)
    assert tiers["float32"] > 490


def band_vote_one_query(similarities: np.ndarray, labels: np.ndarray, k: int, bound: float) -> int | None:
    """The band vote of one query written out plainly: sure neighbours, then the band's one label."""
    k = min(k, len(similarities))
    kth = np.sort(similarities)[::-1][k - 1]
    sure = similarities > kth + 2 * bound
    band = ~sure & (similarities >= kth - 2 * bound)
    if len(np.unique(labels[band])) != 1:
        return None
    chosen = np.concatenate([labels[sure], np.full(k - int(sure.sum()), labels[band][0])])
    return int(knn.vote(chosen[None, :])[0])


def test_band_votes_equal_the_band_vote_of_each_query() -> None:
    rng = np.random.default_rng(5)
    decided = undecided = 0
    for _ in range(300):
        m, q, k = int(rng.integers(1, 25)), int(rng.integers(1, 8)), int(rng.integers(1, 6))
        similarities = rng.integers(-3, 4, size=(m, q)) / 4 + rng.choice([0.0, 1e-12, 1e-3], size=(m, q))
        labels = rng.integers(-1, 3, size=m)
        votes, sure = knn.band_votes(similarities, labels, k, 1e-9)
        for column in range(q):
            expected = band_vote_one_query(similarities[:, column], labels, k, 1e-9)
            assert sure[column] == (expected is not None)
            assert knn.band_vote(similarities[:, column], labels, k, 1e-9) == expected
            if expected is not None:
                assert votes[column] == expected
                decided += 1
            else:
                undecided += 1
    assert decided > 100 and undecided > 100  # both outcomes exercised


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_one_batched_prediction_of_many_keys_agrees_with_sklearn_per_query(seed: int, k: int) -> None:
    """Several keys, several queries each (tie-heavy, so all three tiers occur), some keys unfitted or with
    fewer rows than k: one `predict` call equals sklearn query by query."""
    rng = np.random.default_rng(seed)
    index = ShardIndex(3, "cpu")
    keys: dict[MemoryKey, CachedKey] = {}
    histories: dict[MemoryKey, np.ndarray] = {}
    spans: list[tuple[MemoryKey, int]] = []
    for p in range(int(rng.integers(1, 7))):
        key = MemoryKey(f"p{p}", Group.WRONG)
        n = int(rng.integers(1, 25))
        history = rng.integers(-2, 3, size=(n, 3)).astype(np.float64)
        history[~history.any(axis=1), 0] = 1.0
        dropped = int(rng.integers(0, n)) if rng.random() < 0.3 else 0  # older rows forgotten
        index.append(key, unit_rows(history[dropped:]).astype(np.float32))
        fitted = 0 if rng.random() < 0.2 else n  # some keys have no fit yet
        labels = rng.integers(-1, 3, size=fitted)
        keys[key] = CachedKey(
            start=dropped, n=n, fit_start=0, fitted_upto=fitted, labels=labels, sizes=cluster_sizes(labels)
        )
        histories[key] = history
        spans.append((key, int(rng.integers(1, 6))))
    queries = np.concatenate([rng.integers(-2, 3, size=(q, 3)) for _, q in spans]).astype(np.float64)
    queries[~queries.any(axis=1), 1] = 1.0
    starts = [0, *np.cumsum([q for _, q in spans]).tolist()]
    predicted, sizes = predict(
        index,
        keys,
        RunConfig(knn_k=k, dim=3),
        Groups([key for key, _ in spans], np.arange(len(queries), dtype=np.intp), starts),
        unit_rows(queries).astype(np.float32),
        queries,
        lambda view: histories[view.key][view.lo + keys[view.key].start : view.hi + keys[view.key].start],
        Tiers(),
    )
    for (key, _), lo, hi in zip(spans, starts[:-1], starts[1:], strict=True):
        cached = keys[key]
        live = cached.labels[cached.start :]
        for row in range(lo, hi):
            if not cached.has_fit:
                assert predicted[row] == NO_CLUSTER and sizes[row] == 0
                continue
            expected = sklearn_vote(histories[key][cached.start :], live, queries[row], k)
            assert predicted[row] == expected
            assert sizes[row] == cluster_sizes(live)[expected + 1]


def test_sorted_band_votes_decide_only_complete_single_label_bands() -> None:
    k, bound = 3, 1e-9
    scores = np.array(
        [
            [0.9, 0.5, 0.5, 0.5, 0.1, -np.inf],  # band {0.5 x3} one label, reaches below it: decided
            [0.9, 0.5, 0.5, 0.5, 0.5, 0.5],  # the last score is still in the band: an unseen vector may be too
            [0.9, 0.5, 0.5, 0.5, 0.1, 0.0],  # band labels differ
            [0.9, 0.8, 0.5, 0.5, -np.inf, -np.inf],  # fewer vectors than columns: complete
        ],
        dtype=np.float32,
    )
    labels = np.array([[4, 1, 1, 1, 0, 9], [4, 1, 1, 1, 1, 1], [4, 1, 2, 1, 0, 0], [2, 2, 7, 7, 9, 9]])
    votes, decided = knn.sorted_band_votes(scores, labels, k, bound)
    assert decided.tolist() == [True, False, False, True]
    assert votes[0] == 1 and votes[3] == 2
    # The same decisions as the band vote over every vector (unreturned ones lie far below).
    for row in (0, 3):
        finite = np.isfinite(scores[row])
        assert knn.band_vote(scores[row][finite].astype(np.float64), labels[row][finite], k, bound) == votes[row]
