"""HDBSCAN refits of one key (docs/architecture.md, "The algorithm", step 5), with the reference's labels guaranteed.

The reference calls `hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(normalize(X))`. We call
the same package's own tree-building and labelling functions with the very arguments that estimator passes
them, skipping only its input validation and bookkeeping (most of the cost for the small per-prompt sets we
fit), so the labels are identical by construction; `tests/unit/test_clustering.py` checks this against the
public estimator on thousands of varied sets.
"""

from __future__ import annotations

import warnings

import numpy as np
from hdbscan.hdbscan_ import (  # type: ignore[import-untyped]
    _hdbscan_boruvka_kdtree,
    _hdbscan_prims_kdtree,
    _tree_to_labels,
)
from numpy.typing import NDArray

from .config import RunConfig
from .preprocess import features, unit_rows

# hdbscan's "best" algorithm switches from Boruvka to Prim's KD-tree above this many dimensions.
_BORUVKA_MAX_DIM = 60
_LEAF_SIZE = 40
_CORE_DIST_N_JOBS = 4


def fit_labels(stored: NDArray[np.float32], config: RunConfig) -> NDArray[np.int64]:
    """HDBSCAN labels of a key's stored vectors, in arrival order; fewer than 2 vectors are all noise."""
    n = len(stored)
    if n < 2:
        return np.full(n, -1, dtype=np.int64)
    x = unit_rows(features(stored, config.layer_diff))
    min_samples = max(1, min(n - 1, config.min_samples))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if x.shape[1] > _BORUVKA_MAX_DIM:
            single_linkage, _ = _hdbscan_prims_kdtree(x, min_samples, 1.0, "euclidean", None, _LEAF_SIZE, False)
        else:
            single_linkage, _ = _hdbscan_boruvka_kdtree(
                x, min_samples, 1.0, "euclidean", None, _LEAF_SIZE, True, False, _CORE_DIST_N_JOBS
            )
        labels = _tree_to_labels(
            x,
            single_linkage,
            min_cluster_size=config.min_cluster_size,
            cluster_selection_method=config.cluster_selection_method,
            allow_single_cluster=False,
            match_reference_implementation=False,
            cluster_selection_epsilon=float(config.cluster_selection_epsilon),
        )[0]
    return np.asarray(labels, dtype=np.int64)


def cluster_sizes(labels: NDArray[np.int64]) -> NDArray[np.int64]:
    """sizes[label + 1] = number of stored vectors with that label (index 0 is noise, -1)."""
    return np.bincount(labels + 1).astype(np.int64) if len(labels) else np.zeros(1, np.int64)
