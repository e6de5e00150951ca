"""Per-prompt statistics of sampled answers: pass@1, pass@k, distinct wrong answers, repeat rate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AnswerStats", "answer_stats"]


@dataclass(frozen=True)
class AnswerStats:
    """Means over prompts of k sampled answers each.

    `distinct_wrong`: different wrong answers per prompt (over all prompts; 0 for a prompt with none).
    `top_wrong_repeat`: the share of a prompt's wrong answers that are its most common wrong answer
    (over prompts with at least one wrong answer; NaN when there are none). `planted`: the share of
    samples that are the prompt's planted wrong answer.
    """

    pass_at_1: float
    pass_at_k: float
    distinct_wrong: float
    top_wrong_repeat: float
    planted: float


def answer_stats(
    answers: Sequence[Sequence[str | None]], correct: Sequence[str], planted: Sequence[str]
) -> AnswerStats:
    """`answers[i]` are the k sampled answers (None: no `\\boxed{}`) of prompt i; a missing answer is wrong."""
    pass1, passk, distinct, repeat, planted_share = [], [], [], [], []
    for samples, right, plant in zip(answers, correct, planted, strict=True):
        hits = [a == right for a in samples]
        wrong = Counter("<none>" if a is None else a for a, hit in zip(samples, hits, strict=True) if not hit)
        pass1.append(float(np.mean(hits)))
        passk.append(float(any(hits)))
        distinct.append(float(len(wrong)))
        if wrong:
            repeat.append(max(wrong.values()) / sum(wrong.values()))
        planted_share.append(float(np.mean([a == plant for a in samples])))
    return AnswerStats(
        pass_at_1=float(np.mean(pass1)),
        pass_at_k=float(np.mean(passk)),
        distinct_wrong=float(np.mean(distinct)),
        top_wrong_repeat=float(np.mean(repeat)) if repeat else float("nan"),
        planted=float(np.mean(planted_share)),
    )
