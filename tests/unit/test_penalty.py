"""Penalties, masking by target and noise policy, shaped rewards (docs/architecture.md, "The algorithm", step 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meds_service.core.config import RunConfig
from meds_service.core.penalty import NO_CLUSTER, penalty_of_size, shape
from meds_service.core.types import Group

W, C, U = int(Group.WRONG), int(Group.CORRECT), int(Group.UNKNOWN)


def test_worked_numbers() -> None:
    got = penalty_of_size(np.arange(10), 0.1, 0.2)
    want = [0, 0.0693, 0.1099, 0.1386, 0.1609, 0.1792, 0.1946, 0.2, 0.2, 0.2]
    assert np.allclose(got, want, atol=5e-5)
    assert got[7] == 0.2 and got[6] < 0.2  # the cap is reached at size 7
    assert got.tolist() == [min(0.1 * math.log(s + 1), 0.2) for s in range(10)]


def test_penalty_of_empty_and_2d() -> None:
    assert penalty_of_size(np.zeros(0, np.int64), 0.1, 0.2).shape == (0,)
    assert penalty_of_size(np.array([[0, 3]]), 0.1, 0.2).shape == (1, 2)


def run_shape(groups: list[int], predicted: list[int], sizes: list[int], rewards: list[float], **cfg: object):
    return shape(
        np.array(groups),
        np.array(predicted),
        np.array(sizes),
        np.array(rewards, dtype=np.float64),
        RunConfig(**cfg),  # type: ignore[arg-type]
    )


def test_wrong_target_penalises_wrong_and_masks_correct_sizes() -> None:
    sizes, pen, shaped = run_shape([W, C, U], [0, 0, 0], [3, 3, 3], [0.0, 1.0, 0.5])
    assert sizes.tolist() == [3, 0, 3]  # unknown keeps its size (as the reference) but is never penalised
    assert pen.tolist() == [pytest.approx(0.1 * math.log(4)), 0.0, 0.0]
    assert shaped.tolist() == [-pen[0], 1.0, 0.5]


def test_both_target_shrinks_correct_rewards() -> None:
    _, pen, shaped = run_shape([W, C], [1, 2], [7, 1], [0.0, 1.0], penalty_target="both")
    assert pen.tolist() == [0.2, pytest.approx(0.1 * math.log(2))]
    assert shaped[1] == 1.0 / (1.0 + pen[1])


def test_none_target_masks_everything_and_correct_target_masks_wrong() -> None:
    sizes, pen, _ = run_shape([W, C, U], [0, 0, 0], [3, 3, 3], [0, 1, 0], penalty_target="none")
    assert sizes.tolist() == [0, 0, 0] and pen.tolist() == [0, 0, 0]
    sizes, pen, _ = run_shape([W, C], [0, 0], [3, 3], [0, 1], penalty_target="correct")
    assert sizes.tolist() == [0, 3] and pen[0] == 0 and pen[1] > 0


def test_noise_counts_as_a_cluster_unless_ignored() -> None:
    _, pen, _ = run_shape([W], [-1], [4], [0.0])
    assert pen[0] > 0
    sizes, pen, _ = run_shape([W], [-1], [4], [0.0], noise_policy="ignore")
    assert sizes[0] == 0 and pen[0] == 0


def test_no_prediction_gives_zero_and_missing_reward_stays_nan() -> None:
    sizes, pen, shaped = run_shape([W], [NO_CLUSTER], [0], [float("nan")])
    assert sizes[0] == 0 and pen[0] == 0 and np.isnan(shaped[0])
