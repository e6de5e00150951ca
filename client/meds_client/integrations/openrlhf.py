"""MEDS for OpenRLHF (follows OpenRLHF 0.11.2): penalties applied to experiences next to the length penalties.

OpenRLHF shapes rewards in `ExperienceMaker.compute_advantages_and_returns`: it promotes
`experience.rewards` to float32, calls `apply_length_penalties(experiences, args)`, which edits them
in place, and only then puts them back in rollout order by `experience.index` and normalises them
per prompt group (`group_norm`, `rloo`, `reinforce_baseline`, `dr_grpo`). MEDS belongs right there:

```python
apply_length_penalties(experiences, args)
meds_metrics = apply_meds_penalties(experiences, shaper, step=global_step, model=actor, tokenizer=tokenizer)
```

`experience.scores` (the 0/1 correctness that dynamic filtering reads) is left alone and is what
decides "wrong" vs "correct". The per-sample penalty and cluster size are added to `experience.info`
(logged like OpenRLHF's own per-sample info), and `info["reward"]` is kept in sync as
`apply_length_penalties` does. Experiences are duck-typed (`sequences`, `attention_mask`,
`action_mask`, `rewards`, `scores`, `prompts`, `info`), so OpenRLHF itself is not imported.

In OpenRLHF 0.11 the policy lives in Ray actor groups while the experience maker runs on the driver;
pass `model=` only where the policy is at hand (one process, or a colocated actor), else compute the
fingerprints where the actor runs (`experience_fingerprints`) and pass them as `fingerprints=`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from .._types import FingerprintLike
from ..fingerprint import DEFAULT_BATCH_SIZE, Tokenizer, fingerprint_sequences
from ._shaping import DEFAULT_CORRECTNESS_THRESHOLD, MedsShaper, correctness_from_scores

PENALTY_INFO = "meds_penalty"
CLUSTER_SIZE_INFO = "meds_cluster_size"

__all__ = ["apply_meds_penalties", "experience_fingerprints"]


class ExperienceLike(Protocol):
    """The fields of `openrlhf.trainer.ppo_utils.experience.Experience` used here."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor | None
    prompts: list[str]
    info: dict[str, Any]


def experience_fingerprints(
    model: nn.Module,
    tokenizer: Tokenizer,
    experiences: Sequence[ExperienceLike],
    *,
    last_n_layers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[npt.NDArray[np.float32] | None]:
    """Fingerprints of every sample of every experience, flattened in order (None: no `\\boxed{`)."""
    sequences, starts = [], []
    for experience in experiences:
        for row in range(len(experience.rewards)):
            sequence, start = _prompt_and_response(experience, row)
            sequences.append(sequence)
            starts.append(start)
    return fingerprint_sequences(
        model, tokenizer, sequences, starts, last_n_layers=last_n_layers, batch_size=batch_size
    )


def apply_meds_penalties(
    experiences: Sequence[ExperienceLike],
    shaper: MedsShaper,
    *,
    step: int | None = None,
    fingerprints: Sequence[FingerprintLike | None] | None = None,
    model: nn.Module | None = None,
    tokenizer: Tokenizer | None = None,
    threshold: float = DEFAULT_CORRECTNESS_THRESHOLD,
    last_n_layers: int | None = None,
) -> dict[str, float]:
    """Score all samples and shape `experience.rewards` in place before group normalisation.

    Fingerprints are taken from `fingerprints` (one per sample, flattened over experiences) or
    computed with `model` and `tokenizer`. Correctness is `scores >= threshold` (falling back to
    `rewards` when an experience has no scores). Prompts are keyed by `shaper.prompt_id_fn` of
    `experience.prompts`. Returns `meds/*` batch metrics for the trainer's logger.
    """
    if fingerprints is None:
        if model is None or tokenizer is None:
            raise ValueError("pass fingerprints=, or model= and tokenizer= to compute them")
        fingerprints = experience_fingerprints(model, tokenizer, experiences, last_n_layers=last_n_layers)
    correct = correctness_from_scores(
        _flat(e.scores if e.scores is not None else e.rewards for e in experiences), threshold
    )
    prompts = [text for experience in experiences for text in experience.prompts]
    shaping = shaper.score(
        prompt_ids=shaper.prompt_ids(prompts), correct=correct, fingerprints=list(fingerprints), step=step
    )
    shaped = shaping.shape(_flat(e.rewards for e in experiences))
    offset = 0
    for experience in experiences:
        rows = slice(offset, offset + len(experience.rewards))
        _write_back(experience, shaped[rows], shaping.penalties[rows], shaping.cluster_sizes[rows])
        offset = rows.stop
    return shaping.metrics()


def _write_back(
    experience: ExperienceLike,
    shaped: npt.NDArray[np.float64],
    penalties: npt.NDArray[np.float64],
    cluster_sizes: npt.NDArray[np.int64],
) -> None:
    rewards = experience.rewards
    experience.rewards = torch.as_tensor(shaped, dtype=rewards.dtype, device=rewards.device)
    experience.info[PENALTY_INFO] = torch.as_tensor(penalties, dtype=torch.float32)
    experience.info[CLUSTER_SIZE_INFO] = torch.as_tensor(cluster_sizes, dtype=torch.float32)
    if "reward" in experience.info:
        experience.info["reward"] = experience.rewards.clone()


def _prompt_and_response(experience: ExperienceLike, row: int) -> tuple[list[int], int]:
    """The unpadded tokens of one sample up to the end of its response, and where the response starts.

    OpenRLHF's `action_mask[t]` marks `sequences[t + 1]` as a generated token.
    """
    actions = torch.nonzero(experience.action_mask[row]).flatten()
    if actions.numel() == 0:
        return [], 0
    start, end = int(actions[0]) + 1, int(actions[-1]) + 2
    valid = experience.attention_mask[row, :end].bool()
    tokens = experience.sequences[row, :end][valid].tolist()
    padding_before_response = int((~valid[:start]).sum())
    return tokens, start - padding_before_response


def _flat(tensors: Any) -> list[float]:
    return [float(v) for tensor in tensors for v in torch.as_tensor(tensor).flatten().tolist()]
