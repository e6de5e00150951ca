"""What every trainer integration does the same way: score a batch, turn penalties into rewards, log.

Reward shaping follows the reference (docs/architecture.md, "The algorithm"): a wrong rollout's reward
becomes `r - p`, a correct one's `r / (1 + p)` (non-zero only when the run's `penalty_target` covers correct rollouts),
a rollout of unknown correctness keeps `r`. Rollouts the service could not score (degraded mode,
status `error`) keep `r` too, and are counted.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._client import MedsClient
from .._prompt_id import prompt_id
from .._types import COLLAPSE_METRICS, FingerprintLike, Rollout, ScoreResult, ScoreResults

METRIC_PREFIX = "meds/"
DEFAULT_CORRECTNESS_THRESHOLD = 0.5
"""A rollout counts as correct when its accuracy score is at least this (the reference's `acc >= 0.5`)."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Shaping:
    """The service's answer for one batch, aligned with the trainer's rows."""

    penalties: FloatArray
    cluster_sizes: npt.NDArray[np.int64]
    statuses: list[str]
    correct: list[bool | None]
    collapse: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(COLLAPSE_METRICS, 0.0))

    @classmethod
    def from_results(cls, results: Sequence[ScoreResult], correct: Sequence[bool | None]) -> Shaping:
        if isinstance(results, ScoreResults):  # columns already: no object per rollout
            return cls(results.penalties, results.cluster_sizes, list(results.statuses), list(correct), results.metrics)
        return cls(
            penalties=np.array([r.penalty for r in results], dtype=np.float64),
            cluster_sizes=np.array([r.cluster_size for r in results], dtype=np.int64),
            statuses=[r.status for r in results],
            correct=list(correct),
        )

    def shape(self, rewards: Sequence[float] | npt.NDArray[np.floating[Any]]) -> FloatArray:
        """Shaped rewards: wrong `r - p`, correct `r / (1 + p)`, unknown `r`."""
        return shape_rewards(rewards, self.correct, self.penalties)

    def metrics(self) -> dict[str, float]:
        """Batch-level numbers for the trainer's logger, under `meds/`; the same keys on every call."""
        n = max(len(self.statuses), 1)
        penalised = self.penalties > 0
        statuses = np.array(self.statuses, dtype=object)
        return {
            f"{METRIC_PREFIX}penalty_mean": float(self.penalties.mean()) if self.penalties.size else 0.0,
            f"{METRIC_PREFIX}penalty_max": float(self.penalties.max()) if self.penalties.size else 0.0,
            f"{METRIC_PREFIX}penalized_frac": float(penalised.sum() / n),
            f"{METRIC_PREFIX}cluster_size_mean": float(self.cluster_sizes.mean()) if self.cluster_sizes.size else 0.0,
            f"{METRIC_PREFIX}scored_frac": float(np.isin(statuses, ["scored", "duplicate"]).sum() / n),
            f"{METRIC_PREFIX}skipped_frac": float((statuses == "skipped").sum() / n),
            f"{METRIC_PREFIX}error_frac": float((statuses == "error").sum() / n),
            # the service's error-collapse metrics of the batch (docs/architecture.md, "Error collapse")
            **{f"{METRIC_PREFIX}{name}": float(self.collapse[name]) for name in COLLAPSE_METRICS},
        }


class MedsShaper:
    """A client bound to one run: turns a trainer's per-row data into one scored `Shaping`.

    `prompt_id_fn` maps a prompt's text to its memory key (default: `meds_client.prompt_id`); pass
    your own to key by a dataset id or to strip per-step content from chat-templated prompts.
    """

    def __init__(self, client: MedsClient, run: str, *, prompt_id_fn: Callable[[str], str] = prompt_id) -> None:
        self.client = client
        self.run = run
        self.prompt_id_fn = prompt_id_fn

    def score(
        self,
        *,
        prompt_ids: Sequence[str],
        correct: Sequence[bool | None],
        fingerprints: Sequence[FingerprintLike | None],
        step: int | None = None,
        rollout_ids: Sequence[str] | None = None,
    ) -> Shaping:
        """Score one batch of rows; new unique rollout ids are made when none are given."""
        ids = list(rollout_ids) if rollout_ids is not None else new_rollout_ids(len(prompt_ids))
        if not len(ids) == len(prompt_ids) == len(correct) == len(fingerprints):
            raise ValueError("rollout_ids, prompt_ids, correct and fingerprints must have one entry per rollout")
        rollouts = [
            Rollout(rollout_id=r, prompt_id=p, correct=c, fingerprint=f)
            for r, p, c, f in zip(ids, prompt_ids, correct, fingerprints, strict=True)
        ]
        return Shaping.from_results(self.client.score(self.run, rollouts, step=step), correct)

    def prompt_ids(self, prompt_texts: Sequence[str]) -> list[str]:
        return [self.prompt_id_fn(text) for text in prompt_texts]


def shape_rewards(
    rewards: Sequence[float] | npt.NDArray[np.floating[Any]],
    correct: Sequence[bool | None],
    penalties: Sequence[float] | FloatArray,
) -> FloatArray:
    """Apply MEDS penalties to scalar rewards: wrong `r - p`, correct `r / (1 + p)`, unknown `r`."""
    shaped = np.asarray(rewards, dtype=np.float64).copy()
    p = np.asarray(penalties, dtype=np.float64)
    wrong = np.array([c is False for c in correct], dtype=bool)
    right = np.array([c is True for c in correct], dtype=bool)
    shaped[wrong] -= p[wrong]
    shaped[right] /= 1.0 + p[right]
    return shaped


def correctness_from_scores(
    scores: Sequence[float | None] | npt.NDArray[np.floating[Any]], threshold: float = DEFAULT_CORRECTNESS_THRESHOLD
) -> list[bool | None]:
    """Correct when the accuracy score is at least `threshold`; None (unknown) when there is no score."""
    return [None if s is None or not np.isfinite(s) else bool(s >= threshold) for s in scores]


def new_rollout_ids(n: int, prefix: str = "") -> list[str]:
    """n ids unique across processes and restarts (one random batch id, then the row)."""
    batch = uuid.uuid4().hex
    return [f"{prefix}{batch}-{i}" for i in range(n)]
