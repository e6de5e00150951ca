"""Error collapse: how much wrong rollouts repeat errors already in memory (docs/architecture.md, "Error
collapse"). Pure functions over columns; the engine, the summary and the explorer call them.

A wrong rollout is **judged** when its key had a fit before it arrived (it has a predicted label: a real
cluster `>= 0` or noise `-1`); it **fell into an existing cluster** when that label is a real cluster. A first
visit (no fit yet, `cluster` is null) is not judged and is not a repeat. Inside one prompt, the distribution
of its judged wrong rollouts over labels treats every noise rollout as its own singleton class: an error
seen once is a distinct error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

NAMES = (
    "repeat_rate",
    "distinct_error_clusters",
    "largest_cluster_share",
    "cluster_entropy",
    "penalised_fraction",
    "mean_penalty",
)
"""The keys of every score answer's `metrics`, in this order."""

COUNTS = ("wrong_rollouts", "judged_prompts", "remembered_rollouts")
"""The denominators of the metrics, so that answers of a split batch can be combined exactly."""


@dataclass(frozen=True, slots=True)
class CollapseMetrics:
    """One batch's error-collapse metrics and their denominators (0 metrics when a denominator is 0)."""

    repeat_rate: float = 0.0
    distinct_error_clusters: float = 0.0
    largest_cluster_share: float = 0.0
    cluster_entropy: float = 0.0
    penalised_fraction: float = 0.0
    mean_penalty: float = 0.0
    wrong_rollouts: int = 0
    judged_prompts: int = 0
    remembered_rollouts: int = 0

    def metrics(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in NAMES}

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COUNTS}

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ClusterShape:
    """Per group (a prompt, or a prompt at one step): how its judged wrong rollouts spread over labels."""

    rollouts: NDArray[np.int64]  # judged wrong rollouts of the group
    distinct: NDArray[np.int64]  # real clusters (labels >= 0) among them
    largest_share: NDArray[np.float64]  # the largest real cluster's share of them (0 when all are noise)
    entropy: NDArray[np.float64]  # Shannon entropy in nats; every noise rollout is a class of its own
    noise: NDArray[np.int64]  # noise rollouts among them


def cluster_shape(codes: NDArray[np.int64], labels: NDArray[np.int64], n_groups: int) -> ClusterShape:
    """The spread of labelled rollouts over labels, per group: `codes[i]` in 0..n_groups-1 is rollout i's
    group, `labels[i]` its label (>= 0 a cluster, -1 noise). Vectorised: no Python loop per group."""
    codes = np.asarray(codes, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    rollouts = np.bincount(codes, minlength=n_groups).astype(np.int64)
    is_noise = labels < 0
    noise = np.bincount(codes[is_noise], minlength=n_groups).astype(np.int64)
    entropy = np.zeros(n_groups, dtype=np.float64)
    largest = np.zeros(n_groups, dtype=np.float64)
    distinct = np.zeros(n_groups, dtype=np.int64)
    clustered = ~is_noise
    if clustered.any():
        span = int(labels[clustered].max()) + 1  # one int64 per (group, label): a 1-D sort, not a row sort
        uniq, sizes = np.unique(codes[clustered] * span + labels[clustered], return_counts=True)
        group = uniq // span
        distinct = np.bincount(group, minlength=n_groups).astype(np.int64)
        share = sizes / rollouts[group]
        np.maximum.at(largest, group, share)
        entropy -= np.bincount(group, weights=share * np.log(share), minlength=n_groups)
    # Every noise rollout is a class of size one: it adds (1/n) ln n to its group's entropy.
    with np.errstate(divide="ignore", invalid="ignore"):
        singleton = np.where(rollouts > 0, np.log(np.maximum(rollouts, 1)) / np.maximum(rollouts, 1), 0.0)
    entropy += noise * singleton
    return ClusterShape(rollouts, distinct, largest, np.maximum(entropy, 0.0), noise)


def batch_metrics(
    prompt_ids: Sequence[str],
    wrong: NDArray[np.bool_],
    remembered: NDArray[np.bool_],
    clusters: NDArray[np.int64],
    penalties: NDArray[np.float64],
    no_cluster: int,
) -> CollapseMetrics:
    """The metrics of one batch, from its answer's columns.

    `wrong`: the rollout was sent with `correct=false`; `remembered`: it has a result (scored now, or a
    duplicate answered with its first result; skipped rollouts are left out everywhere); `clusters`: its
    predicted label, `no_cluster` where its key had no fit (a first visit); `penalties`: its penalty.
    """
    remembered = np.asarray(remembered, dtype=bool)
    wrong = np.asarray(wrong, dtype=bool) & remembered
    clusters = np.asarray(clusters, dtype=np.int64)
    n_remembered, n_wrong = int(remembered.sum()), int(wrong.sum())
    kept = np.asarray(penalties, dtype=np.float64)[remembered]
    judged = wrong & (clusters != no_cluster)
    rows = np.flatnonzero(judged)
    # Prompts coded in sorted order, as np.unique would, through dict and map calls: np.unique sorts every
    # rollout's id with Python comparisons, ~3 ms of an 8,192-rollout answer; this sorts each prompt once.
    judged_prompts = [prompt_ids[row] for row in rows.tolist()]
    code_of = {prompt: code for code, prompt in enumerate(sorted(dict.fromkeys(judged_prompts)))}
    codes = np.fromiter(map(code_of.__getitem__, judged_prompts), dtype=np.int64, count=len(rows))
    n_prompts = len(code_of)
    shape = cluster_shape(codes, clusters[rows], n_prompts)
    return CollapseMetrics(
        repeat_rate=_ratio(int((wrong & (clusters >= 0)).sum()), n_wrong),
        distinct_error_clusters=_mean(shape.distinct),
        largest_cluster_share=_mean(shape.largest_share),
        cluster_entropy=_mean(shape.entropy),
        penalised_fraction=_ratio(int((kept > 0).sum()), n_remembered),
        mean_penalty=float(kept.mean()) if n_remembered else 0.0,
        wrong_rollouts=n_wrong,
        judged_prompts=n_prompts,
        remembered_rollouts=n_remembered,
    )


def combine(parts: Sequence[CollapseMetrics]) -> CollapseMetrics:
    """The metrics of several answers taken together (exact when no prompt is split across them)."""
    weights = {
        "repeat_rate": "wrong_rollouts",
        "distinct_error_clusters": "judged_prompts",
        "largest_cluster_share": "judged_prompts",
        "cluster_entropy": "judged_prompts",
        "penalised_fraction": "remembered_rollouts",
        "mean_penalty": "remembered_rollouts",
    }
    totals = {name: sum(int(getattr(p, name)) for p in parts) for name in COUNTS}
    values: dict[str, float] = {}
    for name, weight in weights.items():
        total = totals[weight]
        values[name] = sum(getattr(p, name) * getattr(p, weight) for p in parts) / total if total else 0.0
    return CollapseMetrics(**values, **totals)  # type: ignore[arg-type]


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _mean(values: NDArray[np.int64] | NDArray[np.float64]) -> float:
    return float(np.mean(values)) if len(values) else 0.0
