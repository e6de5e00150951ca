"""Domain types shared by the engine and the storage adapters (plain data, no behaviour beyond helpers)."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import xxhash
from numpy.typing import NDArray

from .collapse import CollapseMetrics


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


STATUSES = (RolloutStatus.SCORED, RolloutStatus.SKIPPED, RolloutStatus.DUPLICATE)  # codes 0, 1, 2
NO_CLUSTER32 = np.iinfo(np.int32).min  # `cluster` of a result without a prediction
# One rollout's result as stored and passed around in bulk: 24 bytes; shaped is NaN when there is none.
RESULT_DTYPE = np.dtype([("cluster", "<i4"), ("size", "<i4"), ("penalty", "<f8"), ("shaped", "<f8")])


@dataclass(frozen=True, slots=True)
class RolloutResult:
    """What a client gets back for one rollout (and what is stored for idempotent retries)."""

    rollout_id: str
    status: RolloutStatus
    cluster: int | None
    cluster_size: int
    penalty: float
    shaped_reward: float | None

    @classmethod
    def from_record(cls, rollout_id: str, status: RolloutStatus, record: np.void) -> RolloutResult:
        cluster, shaped = int(record["cluster"]), float(record["shaped"])
        return cls(
            rollout_id,
            status,
            None if cluster == NO_CLUSTER32 else cluster,
            int(record["size"]),
            float(record["penalty"]),
            None if np.isnan(shaped) else shaped,
        )

    def record(self) -> tuple[int, int, float, float]:
        """This result as one RESULT_DTYPE record (the inverse of `from_record`)."""
        return (
            NO_CLUSTER32 if self.cluster is None else self.cluster,
            self.cluster_size,
            self.penalty,
            np.nan if self.shaped_reward is None else self.shaped_reward,
        )


@dataclass(frozen=True, slots=True)
class ScoreOutcome:
    """The results of one score request in columns (request order): cheap to build for 10^4 rollouts."""

    rollout_ids: list[str]
    status: NDArray[np.int8]  # index into STATUSES
    records: NDArray[np.void]  # RESULT_DTYPE
    metrics: CollapseMetrics = field(default_factory=CollapseMetrics)  # the batch's error collapse

    def __len__(self) -> int:
        return len(self.rollout_ids)

    def __getitem__(self, i: int) -> RolloutResult:
        return RolloutResult.from_record(self.rollout_ids[i], STATUSES[int(self.status[i])], self.records[i])

    def __iter__(self) -> Iterator[RolloutResult]:
        return (self[i] for i in range(len(self)))


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


@dataclass(frozen=True, slots=True)
class KeyDelta:
    """What a key gained since a cached view of it: the vectors with sequence numbers first..n that the
    cache lacks, its live start, and its last fit when that changed."""

    start: int
    n: int
    first: int
    vectors: NDArray[np.float32]
    fit: Fit | None = None


@dataclass(frozen=True, slots=True)
class KeyAppend:
    """What one committed batch adds to one key: vectors (sequence numbers from first_seq) and their
    rollouts' ids and results; `new_start` is the key's first live sequence number afterwards."""

    key: MemoryKey
    first_seq: int
    vectors: NDArray[np.float32]
    new_start: int
    rollout_ids: list[str]
    results: NDArray[np.void]  # RESULT_DTYPE, one per rollout id
    step: int | None = None  # the training step the client sent with the batch
    texts: list[str | None] | None = None  # the rollouts' texts, truncated; None when the run keeps none


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """Everything one score request adds to a run's memory: committed atomically."""

    appends: list[KeyAppend]  # only scored rollouts: skipped ones are not remembered
    fits: list[Fit] = field(default_factory=list)  # labels known without HDBSCAN (keys of < 2 vectors)
    refits: list[MemoryKey] = field(default_factory=list)  # keys that need an HDBSCAN refit afterwards
    # `rollout_hashes` of the appends' rollouts, in append order, when the engine has them (computed once per
    # request, for the duplicate lookup): a store that indexes ids by hash takes them instead of hashing again.
    id_hashes: NDArray[np.uint64] | None = None


def rollout_hashes(prompt_ids: Sequence[str], rollout_ids: Sequence[str]) -> NDArray[np.uint64]:
    """Stable 64-bit hashes (XXH3) of (prompt_id, rollout_id): a rollout's identity in its run, by which a
    store finds a retried rollout's result. Never 0 (0 marks an empty slot of storage/idindex.py)."""
    digest = xxhash.xxh3_64_intdigest
    out = np.fromiter(
        (digest(f"{p}\x00{r}".encode()) for p, r in zip(prompt_ids, rollout_ids, strict=True)),
        dtype=np.uint64,
        count=len(rollout_ids),
    )
    out[out == 0] = 1
    return out


@dataclass(frozen=True, slots=True)
class RolloutBatch:
    """A validated score request in columns: one entry per rollout, in request order."""

    rollout_ids: list[str]
    prompt_ids: list[str]
    groups: NDArray[np.int64]  # Group values
    rewards: NDArray[np.float64]  # NaN where the rollout carries no reward
    fingerprints: NDArray[np.float32]  # [n, dim]; rows where has_fingerprint is False are ignored
    has_fingerprint: NDArray[np.bool_]
    step: int | None = None  # the trainer's step, stored with every remembered rollout
    texts: list[str | None] | None = None  # optional text per rollout (never logged); None when none was sent

    def __len__(self) -> int:
        return len(self.rollout_ids)


@dataclass(frozen=True, slots=True)
class Fit:
    """Labels of one HDBSCAN refit, covering sequence numbers fit_start .. fitted_upto of a key."""

    key: MemoryKey
    labels: NDArray[np.int64]
    fit_start: int
    fitted_upto: int


NO_STEP = -1  # the stored step of a vector whose batch carried none (or that was stored before steps were)


@dataclass(frozen=True, slots=True)
class QueuedRefit:
    """One job taken from a shared refit queue: refit `key` of `run`, then acknowledge `message_id`."""

    message_id: bytes
    run: str
    key: MemoryKey


@dataclass(frozen=True, slots=True)
class KeyRows:
    """A key's normalised vectors of sequence numbers start..n, as an index snapshot holds them."""

    key: MemoryKey
    start: int
    n: int
    rows: NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A run's index on local disk: only a cache of the store, for fast restarts."""

    run: str
    created_at: float
    dim: int
    keys: list[KeyRows]
