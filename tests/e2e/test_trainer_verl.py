"""veRL end to end: real `DataProto` batches fingerprinted by a tiny random model, scored by a live
service over two steps, and advantages computed by veRL's own GRPO estimator on the shaped rewards."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import httpx
import numpy as np
import pytest
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from meds_client import MedsClient
from meds_client.integrations.verl import MedsVerlHook, compute_fingerprints, response_anchor_positions
from meds_client.testing import tiny_model, tiny_tokenizer
from tests.client._fakes import FakeService, decode_matrix

PROMPTS = {"Compute 7 * 6. Answer:": "42", "What is 2 + 3? Answer:": "5"}
RESPONSES = {  # per step: 4 responses per prompt (a GRPO group)
    0: ["so x=\\boxed{41}.", "x=\\boxed{42}", "I think x=\\boxed{40} now", "no idea"],
    1: ["then x=\\boxed{41}", "maybe x=\\boxed{43}.", "x=\\boxed{42}.", "we get x=\\boxed{44}"],
}
RUN = "verl-e2e"


def make_batch(step: int, tokenizer: object) -> DataProto:
    """A batch laid out as veRL's: prompts left-padded, responses right-padded, scores on the last token."""
    encode = tokenizer.encode  # type: ignore[attr-defined]
    rows = [(p, a, r) for p, a in PROMPTS.items() for r in RESPONSES[step]]
    prompts = [encode(p, add_special_tokens=False) for p, _, _ in rows]
    responses = [encode(r, add_special_tokens=False) for _, _, r in rows]
    p_width, r_width = max(map(len, prompts)), max(map(len, responses)) + 2
    prompt_ids, prompt_mask = pad(prompts, p_width, left=True)
    response_ids, response_mask = pad(responses, r_width, left=False)
    acc = np.array([float(f"\\boxed{{{a}}}" in r) for _, a, r in rows])
    scores = torch.zeros((len(rows), r_width))
    scores[torch.arange(len(rows)), response_mask.sum(-1) - 1] = torch.tensor(acc, dtype=torch.float32)
    uids = [str(uuid.uuid4()) for _ in PROMPTS]
    batch: DataProto = DataProto.from_dict(
        tensors={
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], 1),
            "attention_mask": torch.cat([prompt_mask, response_mask], 1),
            "response_mask": response_mask,
            "token_level_scores": scores,
            "token_level_rewards": scores.clone(),
        },
        non_tensors={"uid": np.array([uids[i // 4] for i in range(len(rows))], dtype=object), "acc": acc},
    )
    return batch


def pad(rows: Sequence[Sequence[int]], width: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def reference_grpo(scores: np.ndarray, groups: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """GRPO normalisation written out: (s - mean) / (std + eps) per group, unbiased std."""
    out = np.empty_like(scores)
    for g in np.unique(groups):
        s = scores[groups == g]
        out[groups == g] = (s - s.mean()) / (s.std(ddof=1) + eps)
    return out


@pytest.mark.slow
def test_penalty_is_applied_before_grpo_normalisation(meds_server: str) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    with MedsClient(meds_server) as client:
        hook = MedsVerlHook(client, RUN, tokenizer=tokenizer)
        steps = []
        for step in RESPONSES:
            batch = make_batch(step, tokenizer)
            compute_fingerprints(model, batch, tokenizer, batch_size=3)
            raw = (batch.batch["token_level_scores"].clone(), batch.non_tensor_batch["acc"].copy())
            metrics = hook(batch, step=step)
            steps.append((batch, raw, metrics))
        first_visit_penalties = steps[0][0].non_tensor_batch["meds_penalty"]

    assert not first_visit_penalties.any()  # empty memory: nothing to repeat yet
    batch, (raw_scores, raw_acc), metrics = steps[1]
    acc = batch.non_tensor_batch["acc"]
    penalty = batch.non_tensor_batch["meds_penalty"]
    sizes = batch.non_tensor_batch["meds_cluster_size"]
    wrong = acc < 0.5
    has_fingerprint = np.array([f is not None for f in batch.non_tensor_batch["meds_fingerprint"]])

    assert (penalty[wrong & has_fingerprint] > 0).all()  # every wrong boxed answer repeats a stored one
    assert not penalty[~wrong].any()  # penalty_target "wrong": correct answers untouched
    np.testing.assert_allclose(penalty[wrong], np.minimum(0.1 * np.log1p(sizes[wrong]), 0.2), atol=1e-9)
    assert metrics["meds/penalized_frac"] == pytest.approx((penalty > 0).mean())

    # Raw correctness and scores stay as they were, for DAPO's group filter and for logging.
    torch.testing.assert_close(batch.batch["token_level_scores"], raw_scores)
    np.testing.assert_array_equal(acc, raw_acc)

    # Shaped outcome = acc - p for wrong rows, placed on the last valid response token.
    outcome = batch.batch["token_level_rewards"].sum(-1).double().numpy()
    np.testing.assert_allclose(outcome, acc - penalty, atol=1e-6)
    last = batch.batch["response_mask"].sum(-1) - 1
    changed = (batch.batch["token_level_rewards"] != raw_scores).nonzero()
    assert all(int(col) == int(last[row]) for row, col in changed)

    # veRL's own GRPO estimator normalises the shaped rewards exactly as the reference estimator does.
    advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=batch.batch["token_level_rewards"],
        response_mask=batch.batch["response_mask"],
        index=batch.non_tensor_batch["uid"],
    )
    expected = reference_grpo(acc - penalty, batch.non_tensor_batch["uid"])
    np.testing.assert_allclose(advantages[:, 0].double().numpy(), expected, atol=1e-4)


def test_anchor_positions_index_the_padded_input_ids() -> None:
    tokenizer = tiny_tokenizer()
    batch = make_batch(0, tokenizer)
    anchors = response_anchor_positions(batch, tokenizer)
    assert (anchors >= 0).tolist() == [True, True, True, False] * 2
    brace = tokenizer.convert_ids_to_tokens(batch.batch["input_ids"][0, anchors[0]].item())
    assert brace == "{"


def test_hook_reads_prompt_ids_and_reference_fingerprints_from_columns() -> None:
    service = FakeService()
    batch = make_batch(0, tiny_tokenizer())
    batch.non_tensor_batch["prompt_id"] = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    batch.non_tensor_batch["layer_logits"] = np.array([[1.0, 2.0, 3.0]] * 7 + [[4.0, 5.0, 6.0]], dtype=np.float32)
    client = MedsClient("http://meds.test", http_client=httpx.Client(transport=httpx.MockTransport(service)))
    metrics = MedsVerlHook(client, RUN, fingerprint_key="layer_logits")(batch, step=9)
    sent = service.bodies()[0]
    uids = batch.non_tensor_batch["uid"]
    assert sent["step"] == 9
    assert [r["rollout_id"] for r in sent["rollouts"]] == [f"{uids[i]}/{i % 4}" for i in range(8)]
    assert [r["prompt_id"] for r in sent["rollouts"]] == ["a"] * 4 + ["b"] * 4
    assert [r["correct"] for r in sent["rollouts"]] == [False, True, False, False] + [False] * 4
    assert decode_matrix(sent["fingerprint_matrix"])[-1].tolist() == [4.0, 5.0, 6.0]
    # the fake service penalises wrong rollouts by 0.1
    outcome = batch.batch["token_level_rewards"].sum(-1).numpy()
    np.testing.assert_allclose(outcome, [-0.1, 1, -0.1, -0.1] + [-0.1] * 4, atol=1e-6)
    assert metrics["meds/penalized_frac"] == 7 / 8
