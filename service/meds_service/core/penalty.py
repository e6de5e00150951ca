"""From predicted clusters to penalties and shaped rewards (docs/architecture.md, "The algorithm", step 6)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from .config import RunConfig
from .types import Group

NO_CLUSTER = np.iinfo(np.int64).min  # sentinel in int64 label arrays: no prediction (no fit yet)


def cluster_sizes(labels: NDArray[np.int64]) -> NDArray[np.int64]:
    """sizes[label + 1] = number of stored vectors with that label (index 0 is noise, -1)."""
    return np.bincount(labels + 1).astype(np.int64) if len(labels) else np.zeros(1, np.int64)


def penalty_of_size(cluster_size: NDArray[np.int64], alpha: float, beta: float) -> NDArray[np.float64]:
    """p = min(alpha * ln(cluster_size + 1), beta), with the C library's log like a plain Python reference.

    (numpy's vectorised log may differ from libm in the last bit; sizes take few values, so a table is cheap.)
    """
    sizes, inverse = np.unique(cluster_size, return_inverse=True)
    table = np.array([min(alpha * math.log(int(s) + 1), beta) for s in sizes], dtype=np.float64)
    return table[inverse.reshape(cluster_size.shape)] if len(sizes) else np.zeros(0, np.float64)


def shape(
    groups: NDArray[np.int64],
    predicted: NDArray[np.int64],
    sizes: NDArray[np.int64],
    rewards: NDArray[np.float64],
    config: RunConfig,
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Visible cluster sizes, penalties and shaped rewards of scored rollouts.

    As in the reference, sizes of groups the target does not cover are reported as 0; `unknown` is never
    penalised; `noise_policy="ignore"` turns noise predictions into size 0. `rewards` holds NaN where a rollout
    carries no reward (the shaped reward is then NaN too and reported as null).
    """
    visible = np.isin(groups, [int(g) for g in config.sized_groups()])
    has_cluster = predicted != NO_CLUSTER
    shown = visible & has_cluster
    if config.noise_policy == "ignore":
        shown &= predicted != -1
    out_sizes = np.where(shown, sizes, 0)
    target = config.penalty_target
    penalised = ((groups == Group.WRONG) & (target in ("wrong", "both"))) | (
        (groups == Group.CORRECT) & (target in ("correct", "both"))
    )
    penalty = np.where(penalised, penalty_of_size(out_sizes, config.alpha, config.beta), 0.0)
    shaped = np.where(
        groups == Group.WRONG,
        rewards - penalty,
        np.where(groups == Group.CORRECT, rewards / (1.0 + penalty), rewards),
    )
    return out_sizes, penalty, shaped
