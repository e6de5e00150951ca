"""OpenRLHF end to end: experiences laid out as OpenRLHF 0.11 builds them (one sample each, action
mask shifted by one token), fingerprinted by a tiny random model, shaped against a live service next
to a length penalty, then group-normalised as `compute_advantages_and_returns` does.

OpenRLHF does not install on a CPU-only machine, so `Experience` is mirrored here with the fields the
integration reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from meds_client import MedsClient
from meds_client.integrations import MedsShaper
from meds_client.integrations.openrlhf import apply_meds_penalties, experience_fingerprints
from meds_client.testing import tiny_model, tiny_tokenizer

PROMPTS = {"Compute 7 * 6. Answer:": "42", "What is 2 + 3? Answer:": "5"}
RESPONSES = {
    0: ["so x=\\boxed{41}.", "x=\\boxed{42}", "I think x=\\boxed{40} now", "no idea"],
    1: ["then x=\\boxed{41}", "maybe x=\\boxed{43}.", "x=\\boxed{42}.", "we get x=\\boxed{44}"],
}
N_SAMPLES = 4
RUN = "openrlhf-e2e"


@dataclass
class Experience:
    """The fields of OpenRLHF's Experience that reward shaping touches."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    rewards: torch.Tensor
    scores: torch.Tensor | None
    response_length: torch.Tensor
    prompts: list[str]
    index: list[int]
    info: dict[str, Any] = field(default_factory=dict)


def make_experiences(step: int) -> list[Experience]:
    """One Experience per sample, as `_process_response_into_experience` builds them."""
    tokenizer = tiny_tokenizer()
    experiences = []
    for p_index, (prompt, answer) in enumerate(PROMPTS.items()):
        for s_index, response in enumerate(RESPONSES[step]):
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            response_ids = [*tokenizer.encode(response, add_special_tokens=False), tokenizer.eos_token_id]
            tokens = torch.tensor(prompt_ids + response_ids)
            action_mask = torch.zeros(len(tokens), dtype=torch.long)
            action_mask[len(prompt_ids) : len(tokens)] = 1
            score = float(f"\\boxed{{{answer}}}" in response)
            experiences.append(
                Experience(
                    sequences=tokens.unsqueeze(0),
                    attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                    action_mask=action_mask[1:].unsqueeze(0),
                    rewards=torch.tensor([score]),
                    scores=torch.tensor([score]),
                    response_length=torch.tensor([len(response_ids)]),
                    prompts=[prompt],
                    index=[p_index * N_SAMPLES + s_index],
                    info={"reward": torch.tensor([score])},
                )
            )
    return experiences


def overlong_penalty(experiences: list[Experience], expected_len: int = 6, buffer: int = 4) -> None:
    """DAPO's overlong penalty as OpenRLHF's `apply_overlong_penalty` applies it (in place)."""
    for experience in experiences:
        exceed = min(int(experience.response_length[0]) - expected_len, buffer)
        if exceed > 0:
            experience.rewards[0] += -exceed / buffer


def group_norm(experiences: list[Experience]) -> np.ndarray:
    """OpenRLHF's `group_norm` estimator on the (shaped) rewards, in prompt order."""
    rewards = torch.cat([e.rewards for e in experiences]).reshape(-1, N_SAMPLES)
    normed = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
    return normed.reshape(-1).numpy()


@pytest.mark.slow
def test_penalties_land_in_rewards_before_group_normalisation(meds_server: str) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer))
    with MedsClient(meds_server) as client:
        shaper = MedsShaper(client, RUN)
        for step in RESPONSES:
            experiences = make_experiences(step)
            overlong_penalty(experiences)
            before = torch.cat([e.rewards for e in experiences]).numpy().copy()
            metrics = apply_meds_penalties(experiences, shaper, step=step, model=model, tokenizer=tokenizer)
            if step == 0:
                assert metrics["meds/penalty_mean"] == 0.0  # nothing stored yet

    scores = torch.cat([e.scores for e in experiences if e.scores is not None]).numpy()
    penalties = torch.cat([e.info["meds_penalty"] for e in experiences]).numpy()
    sizes = torch.cat([e.info["meds_cluster_size"] for e in experiences]).numpy()
    rewards = torch.cat([e.rewards for e in experiences]).numpy()
    wrong = scores < 0.5

    assert metrics["meds/penalized_frac"] > 0.5
    assert (penalties[wrong] > 0).all() and not penalties[~wrong].any()  # every error repeats a stored one
    np.testing.assert_allclose(penalties, np.where(wrong, np.minimum(0.1 * np.log1p(sizes), 0.2), 0), atol=1e-6)
    np.testing.assert_allclose(rewards, before - penalties, atol=1e-6)  # on top of the length penalty
    assert scores.tolist() == [float(r.endswith(("42}", "42}."))) for r in RESPONSES[1]] + [0.0] * 4
    for experience in experiences:
        torch.testing.assert_close(experience.info["reward"], experience.rewards)
    np.testing.assert_allclose(group_norm(experiences), _normalised(before - penalties), atol=1e-5)


def _normalised(rewards: np.ndarray) -> np.ndarray:
    grouped = rewards.reshape(-1, N_SAMPLES)
    normed: np.ndarray = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-9)
    return normed.ravel()


def test_fingerprints_follow_the_shifted_action_mask() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    experiences = make_experiences(0)
    vectors = experience_fingerprints(model, tokenizer, experiences)
    assert [v is not None for v in vectors] == [True, True, True, False] * 2
    # Right-padding a sample (as OpenRLHF does when it concatenates experiences) changes nothing.
    padded = experiences[0]
    padded.sequences = torch.cat([padded.sequences, torch.zeros(1, 5, dtype=torch.long)], 1)
    padded.attention_mask = torch.cat([padded.attention_mask, torch.zeros(1, 5, dtype=torch.long)], 1)
    padded.action_mask = torch.cat([padded.action_mask, torch.zeros(1, 5, dtype=torch.long)], 1)
    again = experience_fingerprints(model, tokenizer, [padded])[0]
    assert again is not None and vectors[0] is not None
    np.testing.assert_allclose(again, vectors[0], atol=1e-5)


def test_needs_fingerprints_or_a_model() -> None:
    with pytest.raises(ValueError, match="fingerprints"):
        apply_meds_penalties(make_experiences(0), MedsShaper(MedsClient("http://127.0.0.1:1"), RUN))
