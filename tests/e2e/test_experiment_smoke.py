"""The reproduction experiment, reduced: two GRPO steps per arm, one seed, through TRL and a live `meds serve`.

It checks that the runner works end to end (warm-up, both arms, the service's memory, the CSV), not the
result: the full run is `make experiment`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from experiments.metrics import answer_stats
from experiments.run import SMOKE, STEP_COLUMNS, run_experiment
from experiments.task import ERROR_MODES, Problem, boxed_answer, build_tokenizer, split_problems

PER_STEP = ["step_seconds", "train_pass_at_1", "train_distinct_wrong", "fingerprinted_frac", "memory_vectors",
            "penalty_mean", "penalized_frac"]  # fmt: skip
EVERY_ROW = ["pass_at_1", "pass_at_k", "distinct_wrong", "planted"]


def test_planted_error_modes() -> None:
    assert Problem(47, "+", 8).answer == 55 and Problem(47, "+", 8).planted_answer == 45  # dropped carry
    assert Problem(43, "+", 5).planted_answer == 49  # off by one
    assert Problem(52, "-", 7).planted_answer == -45  # swapped operand
    train, held_out, warm = split_problems(9, 6)
    assert {p.error_mode for p in train} == {p.error_mode for p in held_out} == set(ERROR_MODES)
    assert not set(held_out) & set(warm) and set(train) <= set(warm)
    tokenizer = build_tokenizer()
    text = "47+8=\\boxed{-45}"
    assert len(tokenizer.encode(text, add_special_tokens=False)) == len(text)  # one token per character
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert boxed_answer("\\boxed{12}") == "12" and boxed_answer("12") is None


def test_answer_stats() -> None:
    stats = answer_stats([["5", "4", "4", "3"], ["7", "7", None, "7"]], correct=["5", "7"], planted=["4", "8"])
    assert stats.pass_at_1 == pytest.approx((0.25 + 0.75) / 2)
    assert stats.pass_at_k == 1.0
    assert stats.distinct_wrong == pytest.approx((2 + 1) / 2)
    assert stats.top_wrong_repeat == pytest.approx((2 / 3 + 1.0) / 2)
    assert stats.planted == pytest.approx(0.25)


@pytest.mark.slow
def test_experiment_smoke(tmp_path: Path) -> None:
    frame = run_experiment(SMOKE, tmp_path, progress=False)

    on_disk = pd.read_csv(tmp_path / "steps.csv")
    assert list(on_disk.columns) == STEP_COLUMNS
    assert len(on_disk) == len(frame) == 2 * 3  # two arms x (step 0 + two steps)
    assert set(on_disk["arm"]) == {"grpo", "meds"}
    for arm, rows in on_disk.groupby("arm"):
        assert sorted(rows["step"]) == [0, 1, 2], arm
        trained = rows[rows["step"] > 0]
        for column in PER_STEP:
            assert all(math.isfinite(v) for v in trained[column]), (arm, column)
        for column in EVERY_ROW:
            assert all(math.isfinite(v) for v in rows[column]), (arm, column)
        assert (trained["memory_vectors"] > 0).all()  # the live service stored this arm's fingerprints
        assert (trained["step_seconds"] > 0).all()
    grpo = on_disk[on_disk["arm"] == "grpo"]
    assert (grpo["penalty_mean"].dropna() == 0).all()  # observe-only: the service shapes nothing
