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

FingerprintLike = npt.NDArray[np.floating[Any]] | Sequence[float]
"""One float per layer. numpy arrays are sent in the compact binary form, lists as JSON numbers."""


class RunConfig(TypedDict, total=False):
    """A run's configuration (the service's `RunConfig`; a contract test holds the two equal); every field is
    optional in `put_run`."""

    alpha: float
    beta: float
    knn_k: int
    knn_metric: Literal["cosine"]
    min_cluster_size: int
    min_samples: int
    cluster_selection_method: Literal["eom", "leaf"]
    cluster_selection_epsilon: float
    penalty_target: Literal["wrong", "correct", "both", "none"]
    noise_policy: Literal["cluster", "ignore"]
    layer_diff: bool
    last_n_layers: int | None
    max_memory_per_key: int | None
    consistency: Literal["exact", "fast"]
    dim: int | None
    text_max_chars: int


@dataclass(frozen=True)
class Rollout:
    """One sampled response to be scored and remembered.

    `rollout_id` must be unique within the run: the service answers a repeated id with its first
    result (status `duplicate`), which is what makes retries safe. `correct=None` stores the rollout
    in the `unknown` group, which is never penalised. Without a fingerprint the rollout is skipped.
    `text` (optional) is kept, truncated, only by runs with `text_max_chars > 0`, as cluster examples.
    """

    rollout_id: str
    prompt_id: str
    correct: bool | None = None
    fingerprint: FingerprintLike | None = None
    reward: float | None = None
    text: str | None = None


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


STATUSES: tuple[ScoreStatus, ...] = ("scored", "skipped", "duplicate", "error")
NO_CLUSTER = np.iinfo(np.int32).min
_WIRE_STATUSES = {name: code for code, name in enumerate(STATUSES) if name != "error"}
"""Statuses an answer may carry, by name, and their codes (`error` is the client's own, never sent)."""


COLLAPSE_METRICS = (
    "repeat_rate",
    "distinct_error_clusters",
    "largest_cluster_share",
    "cluster_entropy",
    "penalised_fraction",
    "mean_penalty",
)
"""The keys of `ScoreResults.metrics`: the service's error-collapse metrics of the batch."""

# Each metric's denominator in the answer's `metric_counts`: answers of a split batch combine by them.
_METRIC_WEIGHTS = {
    "repeat_rate": "wrong_rollouts",
    "distinct_error_clusters": "judged_prompts",
    "largest_cluster_share": "judged_prompts",
    "cluster_entropy": "judged_prompts",
    "penalised_fraction": "remembered_rollouts",
    "mean_penalty": "remembered_rollouts",
}


def _metrics_part(metrics: Any, counts: Any) -> tuple[dict[str, float], dict[str, int]] | None:
    """One answer's metrics and their denominators; None when the service sent none (an older service)."""
    if not isinstance(metrics, Mapping) or not isinstance(counts, Mapping):
        return None
    try:
        values = {name: float(metrics[name]) for name in COLLAPSE_METRICS}
        weights = {name: int(counts[name]) for name in set(_METRIC_WEIGHTS.values())}
    except (KeyError, TypeError, ValueError):
        return None
    return values, weights


class ScoreResults(Sequence[ScoreResult]):
    """The results of one `score` call, in request order.

    A sequence of `ScoreResult` backed by columns: a result object is only made when one is read, so
    a trainer that wants the numbers of 10^4 rollouts takes the columns (`penalties`, `cluster_sizes`,
    `status_codes`, `shaped_rewards`) as numpy arrays instead.
    """

    STATUSES = STATUSES
    __slots__ = ("_cluster", "_ids", "_metric_parts", "_penalty", "_shaped", "_size", "_status")

    def __init__(
        self,
        rollout_ids: Sequence[str],
        status: npt.NDArray[np.int8],
        cluster: npt.NDArray[np.int64],
        cluster_size: npt.NDArray[np.int64],
        penalty: npt.NDArray[np.float64],
        shaped_reward: npt.NDArray[np.float64],
    ) -> None:
        self._ids = list(rollout_ids)
        self._status, self._cluster, self._size = status, cluster, cluster_size
        self._penalty, self._shaped = penalty, shaped_reward
        self._metric_parts: list[tuple[dict[str, float], dict[str, int]]] = []

    @classmethod
    def empty(cls, size: int) -> ScoreResults:
        return cls.errors([""] * size)

    @classmethod
    def errors(cls, rollout_ids: Sequence[str]) -> ScoreResults:
        """Degraded mode's stand-ins: status `error`, penalty 0."""
        n = len(rollout_ids)
        return cls(rollout_ids, np.full(n, STATUSES.index("error"), np.int8), np.full(n, NO_CLUSTER, np.int64),
                   np.zeros(n, np.int64), np.zeros(n), np.full(n, np.nan))  # fmt: skip

    @classmethod
    def from_json(cls, items: Sequence[Mapping[str, Any]]) -> ScoreResults:
        """The `results` of a JSON answer, read a column at a time: the same checks as `ScoreResult.from_json`
        (ValueError on an unknown status, KeyError on a missing field), without an object per rollout: 8,192
        results take a tenth of the time."""
        try:
            status = [_WIRE_STATUSES[item["status"]] for item in items]
        except KeyError:
            for item in items:  # say which one
                ScoreResult.from_json(item)
            raise
        clusters = [item.get("cluster") for item in items]
        shaped = [item.get("shaped_reward") for item in items]
        return cls(
            [str(item["rollout_id"]) for item in items],
            np.array(status, dtype=np.int8),
            np.array([NO_CLUSTER if c is None else c for c in clusters], dtype=np.int64),
            np.array([item["cluster_size"] for item in items], dtype=np.int64),
            np.array([item["penalty"] for item in items], dtype=np.float64),
            np.array([np.nan if x is None else x for x in shaped], dtype=np.float64),
        )

    def put(self, positions: Sequence[int], part: ScoreResults) -> None:
        """Write a chunk's results at their positions in this batch's order."""
        if len(part._ids) == len(self._ids) and list(positions) == list(range(len(self._ids))):
            self._ids = list(part._ids)  # the usual single chunk: no Python loop over its ids
        else:
            for position, rollout_id in zip(positions, part._ids, strict=True):
                self._ids[position] = rollout_id
        index = np.asarray(positions, dtype=np.intp)
        self._status[index], self._cluster[index], self._size[index] = part._status, part._cluster, part._size
        self._penalty[index], self._shaped[index] = part._penalty, part._shaped
        self._metric_parts += part._metric_parts

    def add_metrics(self, metrics: Any, counts: Any) -> ScoreResults:
        """Attach one answer's `metrics` and `metric_counts` (ignored when absent or malformed)."""
        part = _metrics_part(metrics, counts)
        if part is not None:
            self._metric_parts.append(part)
        return self

    @property
    def metrics(self) -> dict[str, float]:
        """The batch's error-collapse metrics (keys `COLLAPSE_METRICS`, always all of them; 0.0 where no
        answer carried any). A batch sent in several requests is combined by each metric's denominator:
        exact unless one prompt's rollouts were split across requests."""
        out = {}
        for name in COLLAPSE_METRICS:
            weight = _METRIC_WEIGHTS[name]
            total = sum(counts[weight] for _, counts in self._metric_parts)
            weighted = sum(values[name] * counts[weight] for values, counts in self._metric_parts)
            out[name] = weighted / total if total else 0.0
        return out

    @property
    def rollout_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def statuses(self) -> list[ScoreStatus]:
        return [STATUSES[s] for s in self._status.tolist()]

    @property
    def status_codes(self) -> npt.NDArray[np.int8]:
        """Each status as its index in `STATUSES` (0 scored, 1 skipped, 2 duplicate, 3 error)."""
        return self._status.copy()

    @property
    def penalties(self) -> npt.NDArray[np.float64]:
        return self._penalty.copy()

    @property
    def cluster_sizes(self) -> npt.NDArray[np.int64]:
        return self._size.copy()

    @property
    def shaped_rewards(self) -> npt.NDArray[np.float64]:
        """NaN where the rollout carried no reward (or was not scored)."""
        return self._shaped.copy()

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]
        cluster, shaped = int(self._cluster[i]), float(self._shaped[i])
        return ScoreResult(
            self._ids[i],
            STATUSES[int(self._status[i])],
            None if cluster == NO_CLUSTER else cluster,
            int(self._size[i]),
            float(self._penalty[i]),
            None if np.isnan(shaped) else shaped,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ScoreResults({len(self)} rollouts)"


@dataclass(frozen=True)
class Run:
    """A run (one training job's memory): its id, full config and statistics."""

    run: str
    config: dict[str, Any]
    stats: dict[str, Any]
    created: bool | None = None
    """`put_run` only: True when it created the run (HTTP 201), False when it updated one. None on reads."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any], *, created: bool | None = None) -> Run:
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
