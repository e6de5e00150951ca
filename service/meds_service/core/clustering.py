"""HDBSCAN refits of one key (docs/architecture.md, "The algorithm", step 5), with the reference's labels guaranteed.

The reference calls `hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(normalize(X))`. A fit has
two halves (docs/architecture.md, "Refit arithmetic"):

1. the minimum spanning tree of the mutual-reachability graph: we call the `hdbscan` package's own KD-tree
   Boruvka (or Prim's, above 60 dimensions) with the very arguments its estimator passes, skipping only the
   estimator's input validation and bookkeeping;
2. the tree's labels: single linkage, the condensed tree, excess-of-mass selection and labelling. The
   package runs these in Cython that indexes numpy arrays one Python object at a time, which costs more than
   the spanning tree on a few hundred points. We compute the same integers and the same float64 values in
   the same order on Python lists and numpy columns (including the float32 sum the package uses to compare a
   cluster with its children), so the labels are identical, ties and duplicates included.

`tests/unit/test_clustering.py` checks every half against the package, and the labels against the public
estimator, on thousands of varied sets. Options the fast selection does not cover (`leaf`, an epsilon) pass
our condensed tree, which is bit-identical to the package's, to the package's own selection.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import sklearn
from hdbscan._hdbscan_boruvka import KDTreeBoruvkaAlgorithm  # type: ignore[import-untyped]
from hdbscan._hdbscan_tree import compute_stability, get_clusters  # type: ignore[import-untyped]
from hdbscan.hdbscan_ import _hdbscan_prims_kdtree  # type: ignore[import-untyped]
from numpy.typing import NDArray
from sklearn.neighbors import KDTree

from .config import RunConfig
from .preprocess import features, unit_rows

Checker = Callable[..., Any]

# hdbscan's "best" algorithm switches from Boruvka to Prim's KD-tree above this many dimensions.
_BORUVKA_MAX_DIM = 60
_LEAF_SIZE = 40
_CORE_DIST_N_JOBS = 4  # the estimator's default; the package parallelises only above 16,384 points
# Nearest neighbours from a Gram matrix cost O(n^2 d) against the tree's O(n log n), yet at dimension 14 they
# take under half the dual-tree query's time up to 16,384 points (2.0 vs 8.5 ms at 1,000, 484 vs 1,151 ms at
# 16,384); above that the package splits the query over processes, which this answer does not stand in for.
_DENSE_MAX_POINTS = 16_384
_DENSE_BLOCK_ROWS = 256

CONDENSED = np.dtype([("parent", np.intp), ("child", np.intp), ("lambda_val", np.float64), ("child_size", np.intp)])
"""The package's condensed-tree record: one row per (cluster, child cluster or point leaving it)."""


def fit_labels(stored: NDArray[np.float32], config: RunConfig) -> NDArray[np.int64]:
    """HDBSCAN labels of a key's stored vectors, in arrival order.

    Fewer than `2 * min_cluster_size` vectors are all noise without a fit: a label other than noise needs a
    cluster below the root, and the root only splits into clusters when both parts hold `min_cluster_size`
    points (the reference never selects the root: `allow_single_cluster` is off)."""
    n = len(stored)
    if n < 2 * config.min_cluster_size:
        return np.full(n, -1, dtype=np.int64)
    x = unit_rows(features(stored, config.layer_diff))
    hierarchy = single_linkage_tree(x, max(1, min(n - 1, config.min_samples)))
    condensed = condense_tree(hierarchy, config.min_cluster_size)
    if config.cluster_selection_method == "eom" and config.cluster_selection_epsilon == 0.0:
        return eom_labels(condensed, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = get_clusters(
            condensed,
            compute_stability(condensed),
            config.cluster_selection_method,
            False,  # allow_single_cluster
            False,  # match_reference_implementation
            float(config.cluster_selection_epsilon),
            0,  # max_cluster_size
            float("inf"),  # cluster_selection_epsilon_max
        )[0]
    return np.asarray(labels, dtype=np.int64)


def skip_tree_input_checks() -> None:
    """Let scikit-learn's KD-tree skip `check_array` on arrays it would return unchanged (float64, 2-D,
    C-ordered, non-empty, finite by `sklearn.set_config(assume_finite=True)`); any other input still goes
    through it. The check's dataframe probing costs a fifth of a small fit and the tree is built three times
    per fit. Results are unchanged by construction: `check_array` returns such an array itself. Process-wide,
    so only the refitter's warm-up calls it (`workers._warm`), next to `assume_finite`."""
    from sklearn.neighbors import _kd_tree

    checker = _kd_tree.check_array
    if getattr(checker, "meds_fast_path", False):
        return
    _kd_tree.check_array = _fast_path_check(checker)


def _fast_path_check(checker: Checker) -> Checker:
    def check(array: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            type(array) is np.ndarray
            and array.dtype == np.float64
            and array.ndim == 2
            and array.shape[0] > 0
            and array.shape[1] > 0
            and array.flags.c_contiguous
            and kwargs.get("order", "C") == "C"
            and kwargs.get("dtype", np.float64) == np.float64
            and not args
            and sklearn.get_config()["assume_finite"]
        ):
            return array
        return checker(array, *args, **kwargs)

    check.meds_fast_path = True  # type: ignore[attr-defined]
    check.__wrapped__ = checker  # type: ignore[attr-defined]
    return check


# ---- half 1: the spanning tree, by the package ---------------------------------------------------------


def spanning_tree(x: NDArray[np.float64], min_samples: int) -> NDArray[np.float64]:
    """The mutual-reachability minimum spanning tree `[from, to, distance]`, sorted by distance as the
    package sorts it, from the package's KD-tree Boruvka (`_hdbscan_boruvka_kdtree`'s own steps).

    The Boruvka asks its first tree one question: every point's `min_samples + 1` nearest neighbours (core
    distances and first edges). With `min_samples = 1` and a unique nearest neighbour per point, that answer
    does not depend on how it is found, and `nearest_neighbours` gives it for far less than the tree's dual
    traversal; otherwise the tree answers, as in the package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        known = nearest_neighbours(x) if min_samples == 1 and len(x) <= _DENSE_MAX_POINTS else None
        tree = KDTree(x, metric="euclidean", leaf_size=_LEAF_SIZE) if known is None else AnsweredQuery(x, known)
        boruvka = KDTreeBoruvkaAlgorithm(
            tree,
            min_samples,
            metric="euclidean",
            leaf_size=_LEAF_SIZE // 3,
            approx_min_span_tree=True,
            n_jobs=_CORE_DIST_N_JOBS,
        )
        edges = boruvka.spanning_tree()
    return np.asarray(edges[np.argsort(edges.T[2]), :], dtype=np.float64)


class AnsweredQuery:
    """Stands in for the KD-tree the package's Boruvka queries for core distances: holds its data and the
    answer to its one `query(data, k=2, dualtree=True, breadth_first=True)`, computed beforehand."""

    def __init__(self, x: NDArray[np.float64], answer: tuple[NDArray[np.float64], NDArray[np.intp]]) -> None:
        self.data = x
        self._answer = answer

    def query(self, data: Any, k: int, **_: Any) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
        assert k == 2 and len(data) == len(self.data), "answers only the Boruvka's core-distance query"
        return self._answer


def nearest_neighbours(x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.intp]] | None:
    """Each row's two nearest rows (itself first) and their distances, bit for bit as scikit-learn's
    KD-tree returns them, or None when some row's nearest other row is not unique (then the tree's order
    among equals decides, and only the tree can answer).

    Candidates come from a Gram-matrix distance (BLAS, in blocks of rows), in float32 first: a row whose
    smallest distance is clear of its second by twice an error bound has its nearest row. The rows where it is
    not are scanned again in float64, and those still unclear have every candidate within the margin measured
    as the tree measures it (squared differences summed in column order, `euclidean_rdist`): the one alone at
    the smallest exact distance is the answer. The bound `8 (d + 4) eps max|x|^2` is twice the rounding error
    of the Gram distance and of the cast to float32 (float64 throughout where float32 would over- or
    underflow)."""
    n, d = x.shape
    scale = float(np.einsum("ij,ij->i", x, x).max(initial=0.0))
    if n < 2 or scale == 0.0:
        return None
    coarse: NDArray[np.floating] = x.astype(np.float32) if 1e-20 < scale < 1e20 else x
    levels: list[NDArray[np.floating]] = [coarse, x]
    margins = [2.0 * 8.0 * (d + 4) * float(np.finfo(rows.dtype).eps) * scale for rows in levels]
    squares = [np.einsum("ij,ij->i", rows, rows) for rows in levels]
    nearest = np.empty(n, dtype=np.intp)
    for start in range(0, n, _DENSE_BLOCK_ROWS):
        unsure = np.arange(start, min(n, start + _DENSE_BLOCK_ROWS))
        for rows, level_squares, margin in zip(levels, squares, margins, strict=True):
            block, first, unclear = _gram_nearest(rows, level_squares, unsure, margin)
            nearest[unsure] = first
            if not len(unclear):
                break
            unsure = unsure[unclear]
        else:
            least = block[unclear, first[unclear]]
            resolved = _closest_exactly(x, block[unclear] <= (least[:, None] + margin), unsure)
            if resolved is None:
                return None
            nearest[unsure] = resolved
    rdist = _rdist(x[nearest], x)
    if not rdist.all():  # a duplicate row ties with the row itself at distance 0
        return None
    distances = np.zeros((n, 2), dtype=np.float64)
    distances[:, 1] = np.sqrt(rdist)
    indices = np.empty((n, 2), dtype=np.intp)
    indices[:, 0], indices[:, 1] = np.arange(n), nearest
    return distances, indices


def _gram_nearest(
    x: NDArray[np.floating], squares: NDArray[np.floating], rows: NDArray[np.intp], margin: float
) -> tuple[NDArray[np.floating], NDArray[np.intp], NDArray[np.intp]]:
    """For `rows` of `x`: their Gram distance to every row (`|x_j|^2 - 2 x_i.x_j`: a row's own `|x_i|^2`
    changes neither its order nor its gaps; itself at infinity), the nearest other row by it, and the
    positions (in `rows`) of the rows whose second nearest is within `margin` of the nearest."""
    block = (x[rows] * x.dtype.type(-2.0)) @ x.T
    block += squares
    at = np.arange(len(rows))
    block[at, rows] = np.inf
    first = block.argmin(axis=1)
    least = block[at, first]
    block[at, first] = np.inf
    unclear = np.flatnonzero(block.min(axis=1) - least <= margin)
    block[at, first] = least
    return block, first, unclear


def _closest_exactly(
    x: NDArray[np.float64], candidates: NDArray[np.bool_], rows: NDArray[np.intp]
) -> NDArray[np.intp] | None:
    """For each of `rows`, the candidate (a True in its row of `candidates`) at the smallest exact distance,
    or None when two candidates of a row share it."""
    which, points = np.nonzero(candidates)
    exact = _rdist(x[rows[which]], x[points])
    order = np.lexsort((exact, which))  # by row, then by exact distance
    which, points, exact = which[order], points[order], exact[order]
    heads = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])  # each row's closest; each row has 2 or more
    if np.any(exact[heads + 1] == exact[heads]):
        return None
    return points[heads]


def _rdist(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Squared euclidean distances of rows of `a` and `b` (broadcast), summed in column order without fused
    multiply-adds: scikit-learn's `euclidean_rdist`, bit for bit."""
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    total = np.zeros(np.broadcast_shapes(a2.shape[:1], b2.shape[:1]), dtype=np.float64)
    for j in range(a2.shape[1]):
        step = a2[:, j] - b2[:, j]
        step *= step
        total += step
    return total


def single_linkage_tree(x: NDArray[np.float64], min_samples: int) -> NDArray[np.float64]:
    """The single-linkage hierarchy `[left, right, distance, size]` the package builds for these rows."""
    if x.shape[1] > _BORUVKA_MAX_DIM:  # Prim's: its O(n^2 d) spanning tree dwarfs the labelling
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hierarchy, _ = _hdbscan_prims_kdtree(x, min_samples, 1.0, "euclidean", None, _LEAF_SIZE, False)
        return np.asarray(hierarchy, dtype=np.float64)
    return single_linkage(spanning_tree(x, min_samples))


# ---- half 2: the labels, computed here -----------------------------------------------------------------


def single_linkage(edges: NDArray[np.float64]) -> NDArray[np.float64]:
    """Merge the sorted spanning-tree edges in order: row i joins the clusters holding its two ends into new
    node `n + i`, named (as the package names them) by their current roots, first end first."""
    m = len(edges)
    n = m + 1
    root = list(range(2 * n - 1))
    size = [1] * n + [0] * m
    firsts = edges[:, 0].astype(np.intp).tolist()
    seconds = edges[:, 1].astype(np.intp).tolist()
    lefts, rights, sizes = [0] * m, [0] * m, [0] * m
    for i in range(m):
        a = firsts[i]
        while root[a] != a:
            root[a] = a = root[root[a]]  # path halving: roots only, never the merge order
        b = seconds[i]
        while root[b] != b:
            root[b] = b = root[root[b]]
        merged = n + i
        root[a] = root[b] = merged
        size[merged] = size[a] + size[b]
        lefts[i], rights[i], sizes[i] = a, b, size[merged]
    hierarchy = np.empty((m, 4), dtype=np.float64)
    hierarchy[:, 0], hierarchy[:, 1], hierarchy[:, 2], hierarchy[:, 3] = lefts, rights, edges[:, 2], sizes
    return hierarchy


def condense_tree(hierarchy: NDArray[np.float64], min_cluster_size: int) -> NDArray[np.void]:
    """The condensed tree, row for row the package's `condense_tree`.

    Nodes are visited breadth-first from the root, left child first. A split into two parts of at least
    `min_cluster_size` points makes two new clusters (numbered in visiting order); otherwise the smaller parts'
    points leave the cluster at `lambda = 1 / distance` (infinite at distance 0), listed breadth-first."""
    m = len(hierarchy)
    n = m + 1
    top = 2 * m
    left = hierarchy[:, 0].astype(np.intp).tolist()
    right = hierarchy[:, 1].astype(np.intp).tolist()
    count = [1] * n + hierarchy[:, 3].astype(np.intp).tolist()
    distance = hierarchy[:, 2].tolist()

    def breadth_first(start: int) -> list[int]:
        order, level = [start], [start]
        while level:
            level = [c for node in level if node >= n for c in (left[node - n], right[node - n])]
            order.extend(level)
        return order

    cluster = [0] * (top + 1)
    cluster[top] = n
    next_cluster = n + 1
    parents: list[int] = []
    children: list[int] = []
    lambdas: list[float] = []
    sizes: list[int] = []
    # Breadth-first over the nodes that stay in a cluster: a FIFO queue gives the package's level order, and
    # the parts whose points leave are never queued (the package visits and skips them).
    queue = [top]
    for node in queue:  # grows while it is read
        a, b = left[node - n], right[node - n]
        d = distance[node - n]
        lam = 1.0 / d if d > 0.0 else float("inf")
        own = cluster[node]
        big_a, big_b = count[a] >= min_cluster_size, count[b] >= min_cluster_size
        if big_a and big_b:
            cluster[a], cluster[b] = next_cluster, next_cluster + 1
            parents += (own, own)
            children += (next_cluster, next_cluster + 1)
            lambdas += (lam, lam)
            sizes += (count[a], count[b])
            next_cluster += 2
            queue += (a, b)
            continue
        for part, big in ((a, big_a), (b, big_b)):
            if big:
                cluster[part] = own
                queue.append(part)
                continue
            if part < n:  # one point leaves: most splits of a single-linkage chain
                parents.append(own)
                children.append(part)
                lambdas.append(lam)
                sizes.append(1)
                continue
            points = [sub for sub in breadth_first(part) if sub < n]
            parents += [own] * len(points)
            children += points
            lambdas += [lam] * len(points)
            sizes += [1] * len(points)
    condensed = np.empty(len(parents), dtype=CONDENSED)
    condensed["parent"], condensed["child"] = parents, children
    condensed["lambda_val"], condensed["child_size"] = lambdas, sizes
    return condensed


def eom_labels(condensed: NDArray[np.void], n: int) -> NDArray[np.int64]:
    """Excess-of-mass labels of a condensed tree, as the package's `get_clusters` gives them with
    `allow_single_cluster=False` and no epsilon: the root is never a cluster, clusters are numbered in order
    of their ids, and a point takes the label of the selected cluster it last left (noise if none)."""
    parent = condensed["parent"]
    child = condensed["child"]
    lam = condensed["lambda_val"]
    is_cluster_row = condensed["child_size"] > 1
    n_clusters = int(parent.max()) - n + 1  # every cluster but a leaf is a parent, and a leaf too: of points
    # A cluster is born at the lambda of the row that names it (the root at 0).
    birth = np.zeros(n_clusters, dtype=np.float64)
    birth[child[is_cluster_row] - n] = lam[is_cluster_row]
    # Stability: sum over rows of (lambda - birth of the parent) * child size, added in row order (bincount
    # adds its weights in order, as the package's loop does).
    parent_ix = parent - n
    weights = (lam - birth[parent_ix]) * condensed["child_size"].astype(np.float64)
    stability = np.bincount(parent_ix, weights=weights, minlength=n_clusters).tolist()

    up = [-1] * n_clusters  # the parent cluster of each cluster
    below: list[list[int]] = [[] for _ in range(n_clusters)]  # child clusters, in row order
    for p, c in zip(parent_ix[is_cluster_row].tolist(), (child[is_cluster_row] - n).tolist(), strict=True):
        up[c] = p
        below[p].append(c)
    # Bottom-up (children have higher ids than their parents): a cluster keeps itself if its children's
    # stabilities sum to no more; the package sums them in a C float, so we round to float32 at each step.
    keeps = [False] * n_clusters
    for c in range(n_clusters - 1, 0, -1):
        total = np.float32(0.0)
        for d in below[c]:
            total = np.float32(float(total) + stability[d])
        if float(total) > stability[c]:
            stability[c] = float(total)
        else:
            keeps[c] = True
    # Top-down: a cluster is selected if it keeps itself and no ancestor did; labels follow id order.
    label = [-1] * n_clusters
    blocked = [False] * n_clusters
    next_label = 0
    for c in range(1, n_clusters):
        p = up[c]
        blocked[c] = blocked[p] or (p != 0 and keeps[p])
        if keeps[c] and not blocked[c]:
            label[c] = next_label
            next_label += 1
        else:
            label[c] = label[p]
    labels = np.full(n, -1, dtype=np.int64)
    points = ~is_cluster_row
    labels[child[points]] = np.asarray(label, dtype=np.int64)[parent_ix[points]]
    return labels
