"""TRL GRPO end to end: a tiny random Llama trains for several steps on CPU against a live service,
fingerprinting its completions, and the logged MEDS penalties become non-zero once memory has labels."""

from __future__ import annotations

import re
from typing import Any

import pytest
from datasets import Dataset
from trl.trainer.grpo_config import GRPOConfig

from meds_client import MedsClient, prompt_id
from meds_client.integrations.trl import (
    FINGERPRINT_COLUMN,
    FINGERPRINT_SECONDS_METRIC,
    MedsGRPOTrainer,
    MedsPenaltyReward,
)
from meds_client.testing import tiny_model, tiny_tokenizer

PROMPTS = {"Compute 7 * 6. Answer:": "42", "What is 2 + 3? Answer:": "5"}
RUN = "trl-e2e"


CALLS: list[int] = []


def accuracy(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the last boxed answer is the expected one (a tiny random model is almost always wrong)."""
    CALLS.append(len(completions))
    found = [re.findall(r"\\boxed\{([^}]*)", c) for c in completions]
    return [1.0 if f and f[-1].strip() == a else 0.0 for f, a in zip(found, answer, strict=True)]


def boxed_bias(tokenizer: Any) -> dict[tuple[int, ...], float]:
    """Make a random model write `\\boxed{` now and then, so that completions have an anchor."""
    backslash, boxed, brace = tokenizer.encode("\\boxed{", add_special_tokens=False)
    return {(backslash,): 5.0, (backslash, boxed): 30.0, (boxed, brace): 30.0}


@pytest.mark.slow
def test_grpo_training_logs_meds_penalties(meds_server: str, tmp_path: Any) -> None:
    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_dict({"prompt": list(PROMPTS), "answer": list(PROMPTS.values())})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        num_train_epochs=3,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        learning_rate=1e-4,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        generation_kwargs={"sequence_bias": boxed_bias(tokenizer)},
        reward_weights=[1.0, 1.0, 0.0],
    )
    seen_fingerprints: list[Any] = []
    CALLS.clear()

    def spy(**kwargs: Any) -> list[float]:
        seen_fingerprints.extend(kwargs[FINGERPRINT_COLUMN])
        return [0.0] * len(kwargs[FINGERPRINT_COLUMN])

    with MedsClient(meds_server) as client:
        trainer = MedsGRPOTrainer(
            model=tiny_model("llama", vocab_size=len(tokenizer)),
            processing_class=tokenizer,
            args=args,
            train_dataset=dataset,
            reward_funcs=[accuracy, MedsPenaltyReward(client, RUN, accuracy=accuracy), spy],
        )
        trainer.train()
        memory = [client.get_prompt(RUN, prompt_id(p)) for p in PROMPTS]
        stats = client.get_run(RUN).stats

    logs = [entry for entry in trainer.state.log_history if "rewards/meds_penalty/mean" in entry]
    assert len(logs) >= 6  # 2 prompts x 3 epochs, one prompt (4 completions) per step
    assert len(CALLS) == len(logs)  # the user's accuracy runs once per step, not once more for MEDS
    assert all(entry[FINGERPRINT_SECONDS_METRIC] > 0 for entry in logs)
    with_fingerprint = [f for f in seen_fingerprints if f is not None]
    assert len(with_fingerprint) >= len(seen_fingerprints) // 2
    assert all(f.shape == (3,) for f in with_fingerprint)  # one value per decoder layer
    penalties = [entry["rewards/meds_penalty/mean"] for entry in logs]
    assert penalties[0] == 0.0 and penalties[1] == 0.0  # first visit of each prompt: empty memory
    assert min(penalties[2:]) < 0.0  # later epochs repeat stored errors and are penalised
    assert all(-0.2 - 1e-9 <= p <= 0.0 for p in penalties)  # never more than beta
    assert max(entry["meds/penalized_frac"] for entry in logs) > 0.0
    assert all(entry["meds/error_frac"] == 0.0 for entry in logs)
    assert stats["vectors"] == len(with_fingerprint)  # rollouts without `\\boxed{` are skipped, not stored
    assert all(m.groups["wrong"].vectors > 0 for m in memory)
