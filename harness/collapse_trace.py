"""A multi-epoch training trace with planted error collapse, for the explorer's tests, screenshot and
benchmark: some prompts' wrong answers concentrate on one error mode over the epochs, the others keep
making varied mistakes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CollapseTraceSpec:
    prompts: int = 24
    collapsing: int = 8  # prompts 0..collapsing-1 collapse onto their first error mode
    epochs: int = 6
    rollouts: int = 8  # per prompt per epoch
    prompts_per_step: int = 8
    modes: int = 4  # error modes per prompt
    dim: int = 12
    p_correct: float = 0.3
    p_stray: float = 0.1  # a wrong answer unlike any other (HDBSCAN noise in a healthy prompt)
    seed: int = 0


def collapse_trace(spec: CollapseTraceSpec) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(step, rollouts as score-request JSON objects), every prompt once per epoch."""
    rng = np.random.default_rng(spec.seed)
    modes = rng.standard_normal((spec.prompts, spec.modes, spec.dim)) * 4.0
    right = rng.standard_normal((spec.prompts, spec.dim)) * 4.0
    step = 0
    for epoch in range(spec.epochs):
        # a collapsing prompt's chance of its dominant mode grows from 1/modes to 1
        dominant = 1 / spec.modes + (1 - 1 / spec.modes) * epoch / max(spec.epochs - 1, 1)
        order = rng.permutation(spec.prompts)
        for lo in range(0, spec.prompts, spec.prompts_per_step):
            rollouts = []
            for p in order[lo : lo + spec.prompts_per_step].tolist():
                for r in range(spec.rollouts):
                    correct = bool(rng.random() < spec.p_correct)
                    if correct:
                        centre, why = right[p], "the right derivation"
                    elif p < spec.collapsing and rng.random() < dominant:
                        centre, why = modes[p, 0], "error mode 0"
                    elif p >= spec.collapsing and rng.random() < spec.p_stray:
                        centre, why = rng.standard_normal(spec.dim) * 4.0, "a one-off slip"
                    else:
                        mode = int(rng.integers(spec.modes))
                        centre, why = modes[p, mode], f"error mode {mode}"
                    fingerprint = centre + rng.standard_normal(spec.dim) * 0.1
                    rollouts.append(
                        {
                            "rollout_id": f"e{epoch}-p{p}-r{r}",
                            "prompt_id": f"prompt-{p:03d}",
                            "correct": correct,
                            "fingerprint": fingerprint.astype(np.float32).tolist(),
                            "reward": float(correct),
                            "text": f"epoch {epoch}, prompt {p}: {why} \\boxed{{{p if correct else -p - 1}}}",
                        }
                    )
            yield step, rollouts
            step += 1
