"""Predicting each new rollout's cluster: the kNN vote of core/knn.py over a run's index, in three tiers.

One batched index search (`search_many`: every key's queries against that key's rows) fills a [queries, k+1]
table of similarities and neighbour labels; the certainty test (tier 1) and the vote then run on the whole
table at once. The few queries whose float32 neighbour
sets are not provably the reference's go to tier 2 (float64 similarities) and, for true near-ties, tier 3
(the reference computation on the key's raw features, which `history` loads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import NDArray

from ..core import knn
from ..core.config import RunConfig
from ..core.penalty import NO_CLUSTER
from ..core.types import MemoryKey
from .cache import CachedKey, Groups, KeyView
from .ports import EngineObserver, VectorIndex

# Labels of missing neighbours (fewer stored vectors than k): distinct, and larger than any real label, so
# they never win a vote nor break a tie.
_NO_NEIGHBOUR = np.int64(np.iinfo(np.int64).max)

# Candidates searched beyond k + 1: enough to see past the float32 uncertainty band of most near-ties (near
# duplicates in a key's memory), so that they are decided from the search results, without float64.
EXTRA_NEIGHBOURS = 4

History = Callable[[KeyView], NDArray[np.float64]]
"""The raw features of a key's fitted vectors (view.lo..view.hi), for the reference tier."""


def predict(
    index: VectorIndex | None,
    keys: Mapping[MemoryKey, CachedKey],
    config: RunConfig,
    groups: Groups,
    queries: NDArray[np.float32],
    query_features: NDArray[np.float64],
    history: History,
    observer: EngineObserver,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Predicted label and cluster size of every query (NO_CLUSTER where its key has no fit yet).

    Queries come sorted by key (`groups`): each key fills one contiguous block of the table. One call searches
    every key; the per-key work left in Python is reading each key's fitted part.
    """
    n, k = len(queries), config.knn_k
    predicted = np.full(n, NO_CLUSTER, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    if index is None:
        return predicted, sizes
    fitted = config.fitted_groups()
    views: list[KeyView] = []
    spans: list[tuple[MemoryKey, int, int, int, int]] = []
    for key, lo, hi in groups.spans():
        cached = keys.get(key)
        if cached is None or key.group not in fitted or not cached.has_fit:
            continue
        view = KeyView.of(key, cached)
        views.append(view)
        spans.append((key, view.lo, view.hi, lo, hi))
    if not views:
        return predicted, sizes
    scores, ids = index.search_many(spans, queries, k + 1)

    # Per query row of the searched keys: its key (position in `views`), how many rows that key searched,
    # and where the key's labels and cluster sizes start in the concatenations below.
    q_los = np.array([span[3] for span in spans], dtype=np.int64)
    per_key = np.array([span[4] for span in spans], dtype=np.int64) - q_los
    key_of = np.repeat(np.arange(len(views)), per_key)
    rows = np.arange(len(key_of)) + np.repeat(q_los - np.cumsum(per_key) + per_key, per_key)
    searchable = np.array([view.hi - view.lo for view in views], dtype=np.int64)
    label_start = np.cumsum(searchable) - searchable
    size_count = np.array([len(view.sizes) for view in views], dtype=np.int64)
    size_start = np.cumsum(size_count) - size_count
    all_labels = np.concatenate([view.labels for view in views])
    all_sizes = np.concatenate([view.sizes for view in views])

    m = searchable[key_of]
    top = np.minimum(k, m)
    label_start_of = label_start[key_of]

    def labels_of(found: NDArray[np.int64], starts: NDArray[np.int64]) -> NDArray[np.int64]:
        """Neighbour labels of rows of search ids (-1: no neighbour, distinct labels above any real one)."""
        real = found >= 0
        missing = _NO_NEIGHBOUR - np.arange(found.shape[1], dtype=np.int64)[None, :]
        return np.where(real, all_labels[starts[:, None] + np.where(real, found, 0)], missing)

    bound = knn.float32_bound(index.dim, index.rounding_safety)
    sure = knn.certain_top_k(scores[rows], top, m, bound)
    labels = np.empty(len(rows), dtype=np.int64)
    labels[sure] = knn.vote(labels_of(ids[rows[sure], :k], label_start_of[sure]))
    unsure = np.flatnonzero(~sure)
    if len(unsure):
        # Tier 1b: search the near-ties again for a few more candidates; a band those results reach past and
        # that carries one label decides the vote (every unsure row has more than k searchable vectors).
        # `unsure` ascends, so each key's rows are contiguous in it: one span per key.
        unsure_keys, first, count = np.unique(key_of[unsure], return_index=True, return_counts=True)
        again = [
            (*spans[v][:3], q_lo, q_lo + n)
            for v, q_lo, n in zip(unsure_keys.tolist(), first.tolist(), count.tolist(), strict=True)
        ]
        more_scores, more_ids = index.search_many(again, queries[rows[unsure]], k + 1 + EXTRA_NEIGHBOURS)
        band_labels, decided = knn.sorted_band_votes(more_scores, labels_of(more_ids, label_start_of[unsure]), k, bound)
        labels[unsure[decided]] = band_labels[decided]
        unsure = unsure[~decided]
    for view_index in np.unique(key_of[unsure]).tolist():
        mine = unsure[key_of[unsure] == view_index]
        view, at = views[view_index], rows[mine]
        labels[mine] = _near_ties(index, config, view, queries[at], query_features[at], history, observer)
    predicted[rows] = labels
    sizes[rows] = all_sizes[size_start[key_of] + labels + 1]
    return predicted, sizes


def _near_ties(
    index: VectorIndex,
    config: RunConfig,
    view: KeyView,
    queries: NDArray[np.float32],
    query_features: NDArray[np.float64],
    history: History,
    observer: EngineObserver,
) -> NDArray[np.int64]:
    """Queries of one key whose float32 neighbour sets are not provably the reference's: decide them in
    float64 (one matrix product and one vectorised band vote for the key), and the true near-ties by the
    reference computation."""
    similarities = index.rows(view.key, view.lo, view.hi).astype(np.float64) @ queries.astype(np.float64).T
    labels, decided = knn.band_votes(similarities, view.labels, config.knn_k, knn.float64_bound(index.dim))
    for _ in range(int(decided.sum())):
        observer.knn_fallback("float64")
    undecided = np.flatnonzero(~decided).tolist()
    if undecided:
        raw = history(view)
        for q in undecided:
            observer.knn_fallback("reference")
            labels[q] = knn.reference_vote(raw, view.labels, query_features[q], config.knn_k)
    return labels
