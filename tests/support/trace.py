"""Synthetic multi-epoch training traces: prompts with several error modes, replayed step by step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from harness.reference import RefRollout


@dataclass(frozen=True)
class TraceSpec:
    prompts: int = 48
    rollouts: int = 16
    epochs: int = 6
    dim: int = 14
    prompts_per_step: int = 16
    modes_per_prompt: tuple[int, int] = (2, 5)
    p_no_fingerprint: float = 0.08
    p_unknown: float = 0.05
    p_repeat: float = 0.04  # rollout whose fingerprint exactly repeats an earlier one of its prompt (ties)
    seed: int = 0


def trace_steps(spec: TraceSpec) -> Iterator[list[RefRollout]]:
    """Each step: `prompts_per_step` prompts x `rollouts` rollouts; every prompt comes back every epoch."""
    rng = np.random.default_rng(spec.seed)
    modes = [
        rng.standard_normal((rng.integers(*spec.modes_per_prompt, endpoint=True), spec.dim)) * 3.0
        for _ in range(spec.prompts)
    ]
    right = rng.standard_normal((spec.prompts, spec.dim)) * 3.0
    skill = rng.uniform(0.1, 0.7, size=spec.prompts)
    seen: dict[int, list[list[float]]] = {p: [] for p in range(spec.prompts)}
    for epoch in range(spec.epochs):
        order = rng.permutation(spec.prompts)
        for lo in range(0, spec.prompts, spec.prompts_per_step):
            step = []
            for p in order[lo : lo + spec.prompts_per_step].tolist():
                for r in range(spec.rollouts):
                    correct: bool | None = bool(rng.random() < skill[p])
                    if rng.random() < spec.p_unknown:
                        correct = None
                    if correct:
                        centre = right[p]
                    else:
                        mode = modes[p][min(rng.geometric(0.5) - 1, len(modes[p]) - 1)]
                        centre = mode
                    vec = (centre + rng.standard_normal(spec.dim) * rng.choice([0.05, 0.3, 1.0])) * rng.uniform(0.5, 2)
                    fp: list[float] | None = vec.astype(np.float32).tolist()
                    if seen[p] and rng.random() < spec.p_repeat:
                        fp = list(seen[p][rng.integers(len(seen[p]))])
                    if rng.random() < spec.p_no_fingerprint:
                        fp = None
                    elif fp is not None:
                        seen[p].append(fp)
                    reward = None if rng.random() < 0.3 else float(bool(correct))
                    step.append(RefRollout(f"e{epoch}-p{p}-r{r}", f"prompt-{p}", correct, fp, reward))
            yield step


def to_wire(rollouts: list[RefRollout]) -> dict[str, object]:
    return {
        "rollouts": [
            {
                "rollout_id": r.rollout_id,
                "prompt_id": r.prompt_id,
                "correct": r.correct,
                "fingerprint": r.fingerprint,
                "reward": r.reward,
            }
            for r in rollouts
        ]
    }
