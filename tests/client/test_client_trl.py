"""TRL's real `GRPOTrainer` loop with MEDS on a fake service: a tiny model trains two steps on CPU.

Measured before: the user's `accuracy` ran twice per step (once as a listed reward, once inside the
penalty reward).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import trl
from datasets import Dataset
from trl import GRPOTrainer
from trl.trainer.grpo_config import GRPOConfig

from meds_client import MedsClient
from meds_client.integrations.trl import (
    FINGERPRINT_COLUMN,
    FINGERPRINT_SECONDS_METRIC,
    SCORE_SECONDS_METRIC,
    MedsGRPOTrainer,
    MedsPenaltyReward,
    RememberedAccuracy,
    _GenerateResult,
)
from meds_client.testing import tiny_model, tiny_tokenizer
from tests.client._fakes import FAST_RETRIES, FakeService

PROMPTS = ["Compute 7 * 6. Answer: \\boxed{", "What is 2 + 3? Answer: \\boxed{"]  # prefilled answers


class CountingAccuracy:
    __name__ = "accuracy"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        self.calls += 1
        return [1.0 if re.match(r"\s*42", c) else 0.0 for c in completions]


def grpo_args(tmp_path: Any) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )


def train(tmp_path: Any, trainer_class: type[GRPOTrainer], reward_funcs: list[Any]) -> GRPOTrainer:
    tokenizer = tiny_tokenizer()
    trainer = trainer_class(
        model=tiny_model("llama", vocab_size=len(tokenizer)),
        processing_class=tokenizer,
        args=grpo_args(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        reward_funcs=reward_funcs,
    )
    trainer.train()
    return trainer


@pytest.fixture
def client() -> Any:
    with MedsClient(
        "http://meds.test", http_client=httpx.Client(transport=httpx.MockTransport(FakeService())), retries=FAST_RETRIES
    ) as client:
        yield client


def test_accuracy_runs_once_per_step_and_prefilled_answers_are_fingerprinted(tmp_path: Any, client: MedsClient) -> None:
    accuracy = CountingAccuracy()
    penalty = MedsPenaltyReward(client, "run-1", accuracy=accuracy)
    seen: list[Any] = []

    def spy(**kwargs: Any) -> list[float]:
        seen.extend(kwargs[FINGERPRINT_COLUMN])
        return [0.0] * len(kwargs[FINGERPRINT_COLUMN])

    trainer = train(tmp_path, MedsGRPOTrainer, [accuracy, penalty, spy])
    logs = [entry for entry in trainer.state.log_history if "rewards/meds_penalty/mean" in entry]
    assert len(logs) == 2
    assert accuracy.calls == 2  # was 4: once as a listed reward, once inside the penalty reward
    assert "rewards/accuracy/mean" in logs[0]  # TRL still logs it under its own name
    assert seen and all(f is not None and f.shape == (3,) for f in seen)  # the prompt ends in `\boxed{`
    assert all(entry[FINGERPRINT_SECONDS_METRIC] > 0 and entry[SCORE_SECONDS_METRIC] > 0 for entry in logs)


def test_a_plain_grpo_trainer_can_list_the_remembered_accuracy(tmp_path: Any, client: MedsClient) -> None:
    accuracy = CountingAccuracy()
    penalty = MedsPenaltyReward(client, "run-1", accuracy=accuracy)
    assert isinstance(penalty.accuracy, RememberedAccuracy) and penalty.accuracy.__name__ == "accuracy"
    trainer = train(tmp_path, GRPOTrainer, [penalty.accuracy])
    assert accuracy.calls == 2
    assert all("rewards/accuracy/mean" in entry for entry in trainer.state.log_history[:2])


def test_remembered_accuracy_recomputes_for_a_new_batch() -> None:
    accuracy = CountingAccuracy()
    remembered = RememberedAccuracy(accuracy)
    prompts, completions = ["p", "p"], ["42", "7"]
    assert remembered(prompts=prompts, completions=completions) == [1.0, 0.0]
    assert remembered(prompts=prompts, completions=completions) == [1.0, 0.0]
    assert remembered(prompts=prompts, completions=list(completions)) == [1.0, 0.0]  # an equal but new batch
    assert accuracy.calls == 2


def test_the_private_generate_result_is_read_by_name_and_checked() -> None:
    extra: dict[str, Any] = {}
    result = _GenerateResult.of(([[1, 2]], [[3]], None, ["c"], None, extra, None, None))
    assert (result.prompt_ids, result.completion_ids, result.completions) == ([[1, 2]], [[3]], ["c"])
    assert result.extra_fields is extra and isinstance(result, tuple) and len(result) == 8
    for shape in [
        ([[1, 2]], [[3]], None, ["c"], None, extra, None),  # a field fewer
        ([[1, 2]], [[3]], None, ["c"], None, None, extra, None),  # the extra fields moved
        ([[1, 2]], [[3], [4]], None, ["c"], None, extra, None, None),  # ids that do not pair up
        {"prompt_ids": [[1, 2]]},
    ]:
        with pytest.raises(TypeError, match=rf"TRL {re.escape(trl.__version__)} returned .*prompt_ids, completion_ids"):
            _GenerateResult.of(shape)
