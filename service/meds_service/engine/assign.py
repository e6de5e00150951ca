"""Predicting each new rollout's cluster: the kNN vote of core/knn.py over a run's index, in three tiers.

One index search per key fills a [queries, k+1] table of similarities and neighbour labels; the certainty
test (tier 1) and the vote then run on the whole table at once. The few queries whose float32 neighbour
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

    Queries come sorted by key (`groups`): each key fills one contiguous block of the table.
    """
    n, k = len(queries), config.knn_k
    predicted = np.full(n, NO_CLUSTER, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    if index is None:
        return predicted, sizes
    scores = np.full((n, k + 1), -np.inf, dtype=np.float32)
    neighbours = np.repeat(_NO_NEIGHBOUR - np.arange(k, dtype=np.int64)[None, :], n, axis=0)
    size_of = np.zeros(n, dtype=np.int64)  # offset of the row's key in `all_sizes`
    k_eff = np.zeros(n, dtype=np.int64)
    searchable = np.zeros(n, dtype=np.int64)
    key_of = np.full(n, -1, dtype=np.int64)
    views: list[KeyView] = []
    size_parts: list[NDArray[np.int64]] = []
    size_offset = 0
    fitted = config.fitted_groups()
    for key, lo, hi in groups.spans():
        cached = keys.get(key)
        if cached is None or key.group not in fitted or not cached.has_fit:
            continue
        view = KeyView.of(key, cached)
        found, ids = index.search(key, view.lo, view.hi, queries[lo:hi], k + 1)
        m = view.hi - view.lo
        top = min(k, m)
        scores[lo:hi, : found.shape[1]] = found
        neighbours[lo:hi, :top] = view.labels[ids[:, :top]]
        k_eff[lo:hi], searchable[lo:hi], key_of[lo:hi], size_of[lo:hi] = top, m, len(views), size_offset
        views.append(view)
        size_parts.append(view.sizes)
        size_offset += len(view.sizes)
    rows = np.flatnonzero(key_of >= 0)
    if not len(rows):
        return predicted, sizes
    bound = knn.float32_bound(index.dim, index.rounding_safety)
    sure = knn.certain_top_k(scores[rows], k_eff[rows], searchable[rows], bound)
    predicted[rows[sure]] = knn.vote(neighbours[rows[sure]])
    unsure = rows[~sure]
    for view_index in np.unique(key_of[unsure]).tolist():
        mine = unsure[key_of[unsure] == view_index]
        view = views[view_index]
        predicted[mine] = _near_ties(index, config, view, queries[mine], query_features[mine], history, observer)
    all_sizes = np.concatenate(size_parts)
    sizes[rows] = all_sizes[size_of[rows] + predicted[rows] + 1]
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
    float64 (one matrix product for the key), and the true near-ties by the reference computation."""
    similarities = index.rows(view.key, view.lo, view.hi).astype(np.float64) @ queries.astype(np.float64).T
    bound = knn.float64_bound(index.dim)
    labels = np.empty(len(queries), dtype=np.int64)
    raw: NDArray[np.float64] | None = None
    for q in range(len(queries)):
        label = knn.band_vote(similarities[:, q], view.labels, config.knn_k, bound)
        if label is not None:
            observer.knn_fallback("float64")
            labels[q] = label
            continue
        observer.knn_fallback("reference")
        if raw is None:
            raw = history(view)
        labels[q] = knn.reference_vote(raw, view.labels, query_features[q], config.knn_k)
    return labels
