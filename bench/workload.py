"""A realistic MEDS workload: prompts with recurring error modes, 16 rollouts each, 14-dim fingerprints."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Workload:
    """Fingerprints of `prompts` prompts: each has a few error modes that wrong rollouts repeat."""

    prompts: int = 512
    rollouts: int = 16
    dim: int = 14
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        modes = self.rng.integers(2, 6, size=self.prompts)
        self.modes = [self.rng.standard_normal((m, self.dim)) * 4 for m in modes]
        self.right = self.rng.standard_normal((self.prompts, self.dim)) * 4
        self.skill = self.rng.uniform(0.05, 0.6, size=self.prompts)
        self.prompt_ids = [f"prompt-{i:06d}" for i in range(self.prompts)]

    def step(self, prompts: list[int] | None = None) -> dict[str, np.ndarray | list[str]]:
        """One step's columns: every listed prompt (default all) x `rollouts` rollouts."""
        chosen = list(range(self.prompts)) if prompts is None else prompts
        n = len(chosen) * self.rollouts
        prompt_idx = np.repeat(np.asarray(chosen), self.rollouts)
        correct = self.rng.random(n) < self.skill[prompt_idx]
        fps = np.empty((n, self.dim), dtype=np.float64)
        for i, p in enumerate(prompt_idx.tolist()):
            if correct[i]:
                centre = self.right[p]
            else:
                modes = self.modes[p]
                centre = modes[min(int(self.rng.geometric(0.45)) - 1, len(modes) - 1)]
            fps[i] = centre
        fps += self.rng.standard_normal((n, self.dim)) * self.rng.choice([0.1, 0.5, 1.5], size=(n, 1))
        return {
            "rollout_ids": [uuid.uuid4().hex for _ in range(n)],
            "prompt_ids": [self.prompt_ids[p] for p in prompt_idx.tolist()],
            "correct": correct,
            "fingerprints": fps.astype(np.float32),
            "rewards": correct.astype(np.float64),
        }
