"""Domain types shared by the engine and the storage adapters (plain data, no behaviour beyond helpers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray


class Group(enum.IntEnum):
    """Correctness group of a rollout; a memory key is (prompt_id, group) inside a run."""

    WRONG = 0
    CORRECT = 1
    UNKNOWN = 2

    @classmethod
    def of(cls, correct: bool | None) -> Group:
        if correct is None:
            return cls.UNKNOWN
        return cls.CORRECT if correct else cls.WRONG

    @property
    def wire(self) -> str:
        return self.name.lower()


class MemoryKey(NamedTuple):
    prompt_id: str
    group: Group


class RolloutStatus(enum.Enum):
    SCORED = "scored"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class RolloutResult:
    """What a client gets back for one rollout (and what is stored for idempotent retries)."""

    rollout_id: str
    status: RolloutStatus
    cluster: int | None
    cluster_size: int
    penalty: float
    shaped_reward: float | None

    def as_duplicate(self) -> RolloutResult:
        return RolloutResult(
            self.rollout_id,
            RolloutStatus.DUPLICATE,
            self.cluster,
            self.cluster_size,
            self.penalty,
            self.shaped_reward,
        )


@dataclass(slots=True)
class KeyState:
    """A key's durable memory as the store holds it.

    `vectors` are the stored (preprocessed, un-normalised) float32 rows with sequence numbers
    `start .. start+len(vectors)`; `labels` are those of the last fit, which covered sequence numbers
    `fit_start .. fitted_upto` (empty when never fitted).
    """

    vectors: NDArray[np.float32]
    start: int
    labels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    fit_start: int = 0
    fitted_upto: int = 0

    @property
    def n(self) -> int:
        """Sequence number of the next vector (= number of vectors ever appended)."""
        return self.start + len(self.vectors)

    @property
    def fit_is_current(self) -> bool:
        return self.fitted_upto == self.n and self.fit_start == self.start and self.n > 0


@dataclass(frozen=True, slots=True)
class KeyAppend:
    """What one committed batch adds to one key: vectors (sequence numbers from first_seq) and their
    rollouts' ids and results; `new_start` is the key's first live sequence number afterwards."""

    key: MemoryKey
    first_seq: int
    vectors: NDArray[np.float32]
    new_start: int
    rollout_ids: list[str]
    results: list[RolloutResult]


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """Everything one score request adds to a run's memory: committed atomically."""

    appends: list[KeyAppend]  # only scored rollouts: skipped ones are not remembered
    fits: list[Fit] = field(default_factory=list)  # labels known without HDBSCAN (keys of < 2 vectors)


@dataclass(frozen=True, slots=True)
class RolloutBatch:
    """A validated score request in columns: one entry per rollout, in request order."""

    rollout_ids: list[str]
    prompt_ids: list[str]
    groups: NDArray[np.int64]  # Group values
    rewards: NDArray[np.float64]  # NaN where the rollout carries no reward
    fingerprints: NDArray[np.float32]  # [n, dim]; rows where has_fingerprint is False are ignored
    has_fingerprint: NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.rollout_ids)


@dataclass(frozen=True, slots=True)
class Fit:
    """Labels of one HDBSCAN refit, covering sequence numbers fit_start .. fitted_upto of a key."""

    key: MemoryKey
    labels: NDArray[np.int64]
    fit_start: int
    fitted_upto: int
