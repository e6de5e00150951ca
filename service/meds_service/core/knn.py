"""kNN label vote (docs/architecture.md, "The algorithm", step 3), exact to the reference including equal-distance ties.

The reference asks scikit-learn `NearestNeighbors(n_neighbors=min(k, n), metric="cosine",
algorithm="brute")` for each new vector's neighbours among a key's stored vectors and takes the most frequent
of their labels, ties toward the smallest label. We get candidates from a float32 inner-product search over
L2-normalised vectors (FAISS) and prove the neighbour set is the one scikit-learn would pick:

1. float32 scores: the k-th and (k+1)-th similarities differ by more than twice the rounding bound → the set
   of the first k candidates is certain (almost every query); failing that, when the search returned a few
   more candidates than k + 1 and they reach below the uncertainty band around the k-th, a band that
   carries one label gives the same vote whichever of its vectors are picked (`sorted_band_votes`);
2. float64 similarities of the key's normalised vectors, with a bound independent of the dimension; neighbours
   inside the uncertainty band that all carry one label give the same vote whichever are picked;
3. otherwise (true near-ties with different labels) the reference computation itself, on the raw features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

_U32 = 2.0**-24
_U64 = 2.0**-53
_MARGIN = 1e-12


def float32_bound(dim: int, safety: float = 1.0) -> float:
    """Bound on |float32 inner product of normalised vectors - scikit-learn's float64 cosine similarity|.

    It holds for a float32 dot product summed in any order, with or without fused multiply-adds (the error of
    any order is at most gamma_d = d*u/(1 - d*u) for unit vectors), so for FAISS's pairwise scan and its BLAS
    matrix product alike; (dim + 3) also covers rounding each normalised vector to float32 and the result.
    """
    return safety * ((dim + 3) * _U32 * 1.01 + 4 * (dim + 2) * _U64) + _MARGIN


def float64_bound(dim: int) -> float:
    """The same bound for a float64 inner product of the float32-normalised vectors."""
    return 2.0001 * _U32 + 4 * (dim + 2) * _U64 + _MARGIN


def vote(neighbour_labels: NDArray[np.int64]) -> NDArray[np.int64]:
    """Most frequent label per row, ties toward the smallest label (so noise, -1, wins a tie)."""
    rows = np.sort(neighbour_labels, axis=1)
    counts = (rows[:, :, None] == rows[:, None, :]).sum(axis=2)
    # argmax returns the first maximum: on ascending rows that is the smallest of the most frequent labels.
    return np.asarray(rows[np.arange(len(rows)), np.argmax(counts, axis=1)], dtype=np.int64)


def certain_top_k(
    scores: NDArray[np.float32], k: NDArray[np.int64], searchable: NDArray[np.int64], bound: float
) -> NDArray[np.bool_]:
    """Rows of a descending score matrix ([q, k_max+1]) whose first-k set is unambiguous (tier 1).

    Row i asks for its first k[i] of searchable[i] stored vectors: certain when it wants them all, or when
    its k-th and (k+1)-th similarities differ by more than twice the rounding bound.
    """
    rows = np.arange(len(scores))
    kth = scores[rows, k - 1].astype(np.float64)
    after = scores[rows, np.minimum(k, scores.shape[1] - 1)].astype(np.float64)
    return np.asarray((searchable <= k) | (kth - after > 2 * bound))


def sorted_band_votes(
    scores: NDArray[np.float32], neighbour_labels: NDArray[np.int64], k: int, bound: float
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """The band vote on search results alone (tier 1b): rows of descending scores of a query's best
    neighbours ([q, k_search], k_search > k, -inf where none) and those neighbours' labels; (votes, decided).

    Each score is within `bound` of the exact similarity, so the k-th score is within `bound` of the exact
    k-th similarity: neighbours more than 2*bound above it are certainly in the reference's set, those more
    than 2*bound below certainly not. A row is decided when its results reach past the band (the last score
    is below it, so no unreturned vector can be in it) and the band carries one label.
    """
    as64 = scores.astype(np.float64)
    kth = as64[:, k - 1 : k]
    sure = as64 > kth + 2 * bound
    band = ~sure & (as64 >= kth - 2 * bound)
    band_label, one_label = _band_label(band, neighbour_labels, axis=1)
    complete = as64[:, -1] < kth[:, 0] - 2 * bound
    # Scores descend, so the sure neighbours are among the first k; the other places take the band's label.
    chosen = np.where(sure[:, :k], neighbour_labels[:, :k], band_label[:, None])
    return vote(chosen), complete & one_label


def band_vote(similarities: NDArray[np.float64], labels: NDArray[np.int64], k: int, bound: float) -> int | None:
    """Vote from exact-enough similarities of one query to all searchable vectors, or None when ambiguous.

    Vectors more than 2*bound above the k-th similarity are certainly neighbours, those more than 2*bound
    below certainly are not; the rest (the band) fill the remaining places. If the band carries one label,
    every choice gives the same vote.
    """
    votes, decided = band_votes(similarities[:, None], labels, k, bound)
    return int(votes[0]) if decided[0] else None


def band_votes(
    similarities: NDArray[np.float64], labels: NDArray[np.int64], k: int, bound: float
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """`band_vote` of every column of a [vectors, queries] similarity matrix at once: (votes, decided);
    a vote where `decided` is False is meaningless."""
    m = len(similarities)
    k = min(k, m)
    top = np.argpartition(similarities, m - k, axis=0)[m - k :]  # the k largest of each column, in any order
    top_similarities = np.take_along_axis(similarities, top, axis=0)
    kth = top_similarities.min(axis=0)
    sure = similarities > kth + 2 * bound
    band = ~sure & (similarities >= kth - 2 * bound)
    band_label, one_label = _band_label(band, np.broadcast_to(labels[:, None], similarities.shape), axis=0)
    # Every sure vector lies above the k-th similarity, so among the k largest: those keep their labels,
    # the other places take the band's label.
    chosen = np.where(top_similarities > kth + 2 * bound, labels[top], band_label[None, :])
    return vote(chosen.T), one_label


def _band_label(
    band: NDArray[np.bool_], labels: NDArray[np.int64], axis: int
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Per query (along `axis`), the smallest label in its band and whether the band carries that label only.
    A band always holds the k-th neighbour itself, so it is never empty."""
    band_min = np.where(band, labels, np.iinfo(np.int64).max).min(axis=axis)
    band_max = np.where(band, labels, np.iinfo(np.int64).min).max(axis=axis)
    return band_min, np.asarray(band_min == band_max)


def reference_vote(history: NDArray[np.float64], labels: NDArray[np.int64], query: NDArray[np.float64], k: int) -> int:
    """The reference computation verbatim: scikit-learn brute-force cosine kNN on raw features, then the vote."""
    NearestNeighbors = load_reference()
    model = NearestNeighbors(n_neighbors=min(k, len(history)), metric="cosine", algorithm="brute")
    model.fit(history)
    _, indices = model.kneighbors(query.reshape(1, -1))
    return int(vote(labels[indices[0]][None, :])[0])


def load_reference() -> Any:
    """scikit-learn's `NearestNeighbors`, imported on first use: it is a third of a service's start-up, so the
    service imports it in a background thread once it is ready (app.py) rather than before; a near-tie that
    comes first waits for that import (Python's import lock), never for a second one."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors
