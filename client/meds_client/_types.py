"""What the client sends and what it gets back, as small typed records.

Wire JSON is parsed into these once, in one place (`from_json`), so a change of the service's
response shape fails loudly as `APIResponseValidationError` instead of deep inside a trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast

import numpy as np
import numpy.typing as npt

ScoreStatus = Literal["scored", "skipped", "duplicate", "error"]
"""`error` is added by the client only, in degraded mode (`on_error="zero"`)."""
MemoryGroup = Literal["wrong", "correct", "unknown"]

FingerprintLike = npt.NDArray[np.floating[Any]] | Sequence[float]
"""One float per layer. numpy arrays are sent in the compact binary form, lists as JSON numbers."""


class RunConfig(TypedDict, total=False):
    """A run's configuration (DESIGN §2); every field is optional in `put_run`."""

    alpha: float
    beta: float
    knn_k: int
    knn_metric: str
    min_cluster_size: int
    min_samples: int
    cluster_selection_method: str
    cluster_selection_epsilon: float
    penalty_target: Literal["wrong", "correct", "both", "none"]
    noise_policy: Literal["cluster", "ignore"]
    layer_diff: bool
    last_n_layers: int | None
    max_memory_per_key: int | None
    consistency: Literal["exact", "fast"]
    dim: int | None


@dataclass(frozen=True)
class Rollout:
    """One sampled response to be scored and remembered.

    `rollout_id` must be unique within the run: the service answers a repeated id with its first
    result (status `duplicate`), which is what makes retries safe. `correct=None` stores the rollout
    in the `unknown` group, which is never penalised. Without a fingerprint the rollout is skipped.
    """

    rollout_id: str
    prompt_id: str
    correct: bool | None = None
    fingerprint: FingerprintLike | None = None
    reward: float | None = None


@dataclass(frozen=True)
class ScoreResult:
    """The service's verdict on one rollout, in request order."""

    rollout_id: str
    status: ScoreStatus
    cluster: int | None
    cluster_size: int
    penalty: float
    shaped_reward: float | None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> ScoreResult:
        status = item["status"]
        if status not in ("scored", "skipped", "duplicate"):
            raise ValueError(f"unknown status {status!r}")
        cluster = item.get("cluster")
        shaped = item.get("shaped_reward")
        return cls(
            rollout_id=str(item["rollout_id"]),
            status=cast(ScoreStatus, status),
            cluster=None if cluster is None else int(cluster),
            cluster_size=int(item["cluster_size"]),
            penalty=float(item["penalty"]),
            shaped_reward=None if shaped is None else float(shaped),
        )

    @classmethod
    def error(cls, rollout_id: str) -> ScoreResult:
        """The placeholder of degraded mode: no penalty, clearly marked as not scored."""
        return cls(
            rollout_id=rollout_id,
            status="error",
            cluster=None,
            cluster_size=0,
            penalty=0.0,
            shaped_reward=None,
        )


@dataclass(frozen=True)
class Run:
    """A run (one training job's memory): its id, full config and statistics."""

    run: str
    config: dict[str, Any]
    stats: dict[str, Any]
    created: bool = False
    """True only on the `put_run` call that created the run (HTTP 201)."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any], *, created: bool = False) -> Run:
        return cls(
            run=str(body["run"]),
            config=dict(body["config"]),
            stats=dict(body.get("stats") or {}),
            created=created,
        )


@dataclass(frozen=True)
class ReclusterResult:
    """What a forced refit did."""

    run: str
    refitted_keys: int
    vectors: int
    seconds: float

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ReclusterResult:
        return cls(
            run=str(body["run"]),
            refitted_keys=int(body["refitted_keys"]),
            vectors=int(body["vectors"]),
            seconds=float(body["seconds"]),
        )


@dataclass(frozen=True)
class GroupMemory:
    """One key's memory: stored vectors, how many the last fit covered, and its clusters."""

    vectors: int
    fitted: int
    pending_refit: bool
    clusters: dict[int, int]
    """Cluster label (-1 is noise) → number of stored vectors with that label."""
    labels: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> GroupMemory:
        return cls(
            vectors=int(body["vectors"]),
            fitted=int(body["fitted"]),
            pending_refit=bool(body["pending_refit"]),
            clusters={int(label): int(size) for label, size in dict(body.get("clusters") or {}).items()},
            labels=[int(label) for label in body.get("labels") or []],
        )


@dataclass(frozen=True)
class PromptMemory:
    """The memory of one prompt, by group (`wrong`, `correct`, `unknown`)."""

    prompt_id: str
    groups: dict[str, GroupMemory]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> PromptMemory:
        groups = dict(body.get("groups") or {})
        return cls(
            prompt_id=str(body["prompt_id"]),
            groups={str(name): GroupMemory.from_json(group) for name, group in groups.items()},
        )
