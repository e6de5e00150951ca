"""What the engine answers about its memory: typed views, as the API sends them (api/schemas.py)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from numpy.typing import NDArray

from ..core.types import NO_STEP, MemoryKey
from .cache import CachedKey, RunMemory


class RunStats(TypedDict):
    keys: int
    vectors: int
    pending_refits: int
    refits_in_flight: int
    rollouts: int
    dim: int | None
    index_device: str


class ReclusterReport(TypedDict):
    run: str
    refitted_keys: int
    vectors: int
    seconds: float


class ClusterSteps(TypedDict):
    size: int
    first_step: int | None
    last_step: int | None


class GroupView(TypedDict):
    vectors: int
    fitted: int
    pending_refit: bool
    clusters: dict[str, int]
    cluster_steps: dict[str, ClusterSteps]
    labels: list[int]
    steps: list[int | None]


class PromptView(TypedDict):
    prompt_id: str
    groups: dict[str, GroupView]


class MemoryTotals(TypedDict):
    runs: int
    keys: int
    vectors: int
    pending_refits: int
    refits_in_flight: int


def group_view(key: MemoryKey, cached: CachedKey, steps: NDArray[np.int64], run: RunMemory) -> GroupView:
    """One group of a prompt: its last fit's labels, the step of each labelled vector, and per cluster its
    size and the first and last step it was seen at (None where no step was recorded)."""
    labels = cached.labels
    fitted_steps = np.full(len(labels), NO_STEP, dtype=np.int64)
    recorded = steps[cached.fit_start : cached.fitted_upto]
    fitted_steps[: len(recorded)] = recorded
    known = fitted_steps != NO_STEP
    clusters: dict[str, ClusterSteps] = {}
    for label in np.unique(labels).tolist():
        mine = labels == label
        seen = fitted_steps[mine & known]
        clusters[str(label)] = {
            "size": int(mine.sum()),
            "first_step": int(seen.min()) if len(seen) else None,
            "last_step": int(seen.max()) if len(seen) else None,
        }
    return {
        "vectors": cached.live,
        "fitted": cached.fitted_upto - cached.fit_start,
        "pending_refit": key in run.pending,
        "clusters": {label: view["size"] for label, view in clusters.items()},
        "cluster_steps": clusters,
        "labels": labels.tolist(),
        "steps": [None if s == NO_STEP else s for s in fitted_steps.tolist()],
    }
