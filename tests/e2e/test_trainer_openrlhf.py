"""OpenRLHF end to end, following OpenRLHF 0.11.2 (read from its wheel): experiences laid out as
`SamplesGenerator._process_response_into_experience` builds them (one sample each, `action_mask`
shifted by one token, `rewards`/`scores` of shape (1,), `info["reward"]`), fingerprinted by a tiny
random model, shaped against a live service at the call site OpenRLHF has for reward shaping, right
after `apply_length_penalties(experiences, args)` in `ExperienceMaker.compute_advantages_and_returns`,
then grouped by `experience.index` and normalised as that method's `group_norm` does.

OpenRLHF does not install on a CPU-only machine, so `Experience` and the parts of
`compute_advantages_and_returns` around the call site are restated here from its source."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
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
    """OpenRLHF 0.11.2's `Experience` fields (policy, value and multimodal fields left out)."""

    sequences: torch.Tensor  # (B, T) prompt + response
    attention_mask: torch.Tensor  # (B, T)
    action_mask: torch.Tensor  # (B, T - 1): action_mask[t] marks sequences[t + 1] as generated
    rewards: torch.Tensor  # (B,)
    scores: torch.Tensor | None  # (B,) 0/1, read by dynamic filtering
    response_length: torch.Tensor  # (B,)
    truncated: torch.Tensor  # (B,)
    total_length: torch.Tensor  # (B,)
    prompts: list[str]
    labels: list[str]
    index: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Args:
    """The parts of OpenRLHF's args that `apply_length_penalties` reads."""

    reward: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(overlong_buffer_len=4, overlong_penalty_factor=1.0)
    )
    rollout: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(max_new_tokens=10, n_samples_per_prompt=4))


def make_experiences(step: int) -> list[Experience]:
    """One Experience per sample, as `_process_response_into_experience` builds them, with the
    `index` (position in the prompt-major rollout batch) that the experience maker assigns."""
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
                    truncated=torch.tensor([False]),
                    total_length=torch.tensor([float(len(tokens))]),
                    prompts=[prompt],
                    labels=[answer],
                    index=[p_index * N_SAMPLES + s_index],
                    info={"reward": torch.tensor([score]), "score": torch.tensor([score])},
                )
            )
    return experiences


def apply_length_penalties(experiences: list[Experience], args: Args) -> None:
    """OpenRLHF's DAPO overlong penalty (in place): past `max_new_tokens - buffer` tokens, the reward
    drops by the excess over the buffer (capped at 1) times the factor."""
    expected = args.rollout.max_new_tokens - args.reward.overlong_buffer_len
    for experience in experiences:
        for j, length in enumerate(experience.response_length.tolist()):
            exceed = min(length - expected, args.reward.overlong_buffer_len)
            if exceed > 0:
                experience.rewards[j] += -exceed / args.reward.overlong_buffer_len * args.reward.overlong_penalty_factor


def group_norm(experiences: list[Experience], args: Args) -> np.ndarray:
    """`compute_advantages_and_returns`' `group_norm` baseline: rewards put back in rollout order by
    `experience.index`, grouped by prompt, (r - mean) / (std + 1e-9); returned in rollout order."""
    indices = torch.tensor([i for e in experiences for i in (e.index or [])])
    raw = torch.cat([e.rewards for e in experiences])
    rewards = torch.empty_like(raw)
    rewards[indices] = raw
    grouped = rewards.reshape(-1, args.rollout.n_samples_per_prompt)
    normed = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-9)
    return normed.reshape(-1).numpy()


@pytest.mark.slow
def test_penalties_land_in_rewards_before_group_normalisation(meds_server: str) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer))
    args = Args()
    with MedsClient(meds_server) as client:
        shaper = MedsShaper(client, RUN)
        for step in RESPONSES:
            experiences = make_experiences(step)
            for experience in experiences:  # as compute_advantages_and_returns starts
                experience.rewards = experience.rewards.to(torch.float32)
            apply_length_penalties(experiences, args)
            before = torch.cat([e.rewards for e in experiences]).numpy().copy()
            assert (before < torch.cat([e.scores for e in experiences if e.scores is not None]).numpy()).any()
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
    np.testing.assert_allclose(group_norm(experiences, args), _normalised(before - penalties), atol=1e-5)


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
