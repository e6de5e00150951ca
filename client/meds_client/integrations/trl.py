"""MEDS for TRL's `GRPOTrainer`.

Two pieces, used together:

- `MedsGRPOTrainer`: a `GRPOTrainer` that, right after generation, fingerprints every completion
  with the policy model (one no-grad forward pass) and hands the fingerprints to reward functions
  as the `meds_fingerprint` column, through TRL's own extra-fields path.
- `MedsPenaltyReward` (or `AsyncMedsPenaltyReward`): a reward function that sends fingerprints and
  correctness to the service and returns, per completion, the change MEDS makes to the accuracy
  reward (`-p` for a wrong one). Listed next to the accuracy reward with equal weights, the summed
  reward is the shaped reward, before GRPO's group normalisation, as in the reference.

```python
trainer = MedsGRPOTrainer(
    model=model, args=GRPOConfig(...), train_dataset=dataset,
    reward_funcs=[accuracy, MedsPenaltyReward(MedsClient(), "my-run", accuracy=accuracy)],
)
```

Your `accuracy` runs once per step: `MedsPenaltyReward.accuracy` remembers its last answer, and
`MedsGRPOTrainer` puts it in place of `accuracy` in the reward list (with a plain `GRPOTrainer`,
list `penalty.accuracy` instead of `accuracy` yourself). Completions the service could not score
(degraded mode) get `None`, which TRL ignores for that function (it is not a fake zero). TRL calls
reward functions per process on its slice of a group; MEDS keys memory by prompt on the server, so
split groups are fine. The fingerprint pass and the score call are timed and logged as
`meds/fingerprint_seconds` and `meds/score_seconds`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
import trl
from trl.distributed import DistributedBackend
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.grpo_trainer import GRPOTrainer

from .._client import AsyncMedsClient, MedsClient
from .._prompt_id import prompt_id
from .._types import FingerprintLike, Rollout, ScoreResult
from ..fingerprint import DEFAULT_BATCH_SIZE, Tokenizer, fingerprint_sequences
from ._shaping import DEFAULT_CORRECTNESS_THRESHOLD, Shaping, correctness_from_scores, new_rollout_ids

FINGERPRINT_COLUMN = "meds_fingerprint"
PROMPT_ID_COLUMN = "prompt_id"
REWARD_NAME = "meds_penalty"
FINGERPRINT_SECONDS_METRIC = "meds/fingerprint_seconds"
SCORE_SECONDS_METRIC = "meds/score_seconds"
"""The time of the penalty reward's score call (the service round trip), logged through TRL."""

AccuracyReward = Callable[..., Sequence[float | None]]

__all__ = [
    "FINGERPRINT_COLUMN",
    "FINGERPRINT_SECONDS_METRIC",
    "SCORE_SECONDS_METRIC",
    "AsyncMedsPenaltyReward",
    "MedsGRPOTrainer",
    "MedsPenaltyReward",
    "RememberedAccuracy",
]


class _GenerateResult(NamedTuple):
    """What TRL's private `GRPOTrainer._generate` returns, field by field, as of TRL 1.16.

    `MedsGRPOTrainer` reads the prompt and completion token ids and adds its column to
    `extra_fields` (TRL hands those to reward functions as keyword columns); it passes the rest on
    untouched. Being a tuple, an instance is returned to TRL in place of the tuple it came from.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    tool_mask: Any
    completions: Any
    logprobs: Any
    extra_fields: dict[str, Any]
    images: Any
    tool_images: Any

    @classmethod
    def of(cls, generated: object) -> _GenerateResult:
        """Name the fields of `generated`, or fail naming the TRL version if its shape differs."""
        if isinstance(generated, tuple) and len(generated) == len(cls._fields):
            result = cls(*generated)
            prompts, completions = result.prompt_ids, result.completion_ids
            lists = isinstance(prompts, list) and isinstance(completions, list)
            if lists and len(prompts) == len(completions) and isinstance(result.extra_fields, dict):
                return result
        shape = f"a tuple of {len(generated)}" if isinstance(generated, tuple) else type(generated).__name__
        raise TypeError(
            f"GRPOTrainer._generate in TRL {trl.__version__} returned {shape} that MEDS cannot read; MEDS expects "
            f"the {len(cls._fields)} fields of TRL 1.16 ({', '.join(cls._fields)}), with lists of token ids of "
            "equal length and a dict of extra fields"
        )


class MedsGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` that adds the policy's layer-logit fingerprint of every completion to the inputs
    of reward functions (column `meds_fingerprint`: a float32 array, or None without `\\boxed{`).

    `meds_last_n_layers` keeps only the deepest layers (the reference uses 14; None keeps all and
    lets the run's `last_n_layers` decide). `meds_batch_size` rows go through the model at once.
    An accuracy function that is also given to a `MedsPenaltyReward` is called once per step.
    """

    def __init__(
        self,
        *args: Any,
        meds_last_n_layers: int | None = None,
        meds_batch_size: int = DEFAULT_BATCH_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.meds_last_n_layers = meds_last_n_layers
        self.meds_batch_size = meds_batch_size
        self._share_accuracy()

    def _share_accuracy(self) -> None:
        """Put each penalty reward's remembering accuracy in place of the same function in the list."""
        funcs: list[Any] = self.reward_funcs
        for penalty in [f for f in funcs if isinstance(f, _PenaltyRewardBase)]:
            for i, func in enumerate(funcs):
                if func is penalty.accuracy.func:
                    funcs[i] = penalty.accuracy

    def _generate(self, prompts: list[Any]) -> Any:
        generated = _GenerateResult.of(super()._generate(prompts))
        started = time.perf_counter()
        fingerprints = self._fingerprint_completions(generated.prompt_ids, generated.completion_ids)
        generated.extra_fields[FINGERPRINT_COLUMN] = fingerprints
        mode = "train" if getattr(self.model, "training", True) else "eval"
        self._metrics[mode][FINGERPRINT_SECONDS_METRIC].append(time.perf_counter() - started)
        return generated

    def _fingerprint_completions(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]
    ) -> list[npt.NDArray[np.float32] | None]:
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        starts = [len(p) for p in prompt_ids]
        with self._fingerprint_model() as model, torch.no_grad(), self.accelerator.autocast():
            return fingerprint_sequences(
                model,
                cast(Tokenizer, self.processing_class),
                sequences,
                starts,
                last_n_layers=self.meds_last_n_layers,
                batch_size=self.meds_batch_size,
            )

    def _fingerprint_model(self) -> Any:
        """The model to run: under DeepSpeed ZeRO-3 the gathered one, as for generation; otherwise the
        wrapped model itself (FSDP must be called through its wrapper or its own hooks to gather the
        shards; `fingerprint_sequences` looks through DDP and compile wrappers)."""
        if DistributedBackend(self.accelerator).is_zero3:  # type: ignore[no-untyped-call]
            gather = getattr(self.args, "ds3_gather_for_generation", True)
            return unwrap_model_for_generation(self.model_wrapped, self.accelerator, gather_deepspeed3_params=gather)
        return contextlib.nullcontext(self.model_wrapped)


class RememberedAccuracy:
    """An accuracy reward function that remembers its answer for the batch it last saw, so that TRL's
    call (as a listed reward) and the penalty reward's call cost one evaluation per step. A batch is
    recognised by identity: TRL passes the same `prompts` and `completions` lists to every reward."""

    def __init__(self, func: AccuracyReward) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # TRL names the reward after the function
        self._lock = threading.Lock()
        self._last: tuple[Sequence[Any], Sequence[Any], list[float | None]] | None = None

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        with self._lock:
            last = self._last
            if last is not None and last[0] is prompts and last[1] is completions:
                return list(last[2])
            scores = list(self.func(prompts=prompts, completions=completions, **kwargs))
            self._last = (prompts, completions, scores)
            return list(scores)


ClientT = TypeVar("ClientT", MedsClient, AsyncMedsClient)


class _PenaltyRewardBase(Generic[ClientT]):
    """What the sync and async reward functions share: reading TRL's inputs and shaping the answer."""

    __name__ = REWARD_NAME

    def __init__(
        self,
        client: ClientT,
        run: str,
        *,
        accuracy: AccuracyReward,
        threshold: float = DEFAULT_CORRECTNESS_THRESHOLD,
        prompt_id_fn: Callable[[str], str] = prompt_id,
    ) -> None:
        self.client: ClientT = client
        self.run = run
        self.accuracy = accuracy if isinstance(accuracy, RememberedAccuracy) else RememberedAccuracy(accuracy)
        self.threshold = threshold
        self.prompt_id_fn = prompt_id_fn

    def _rollouts(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Rollout], list[float | None]]:
        """The rollouts to score, and the accuracy reward of each completion."""
        if FINGERPRINT_COLUMN not in kwargs:
            raise KeyError(
                f"no {FINGERPRINT_COLUMN!r} column: train with MedsGRPOTrainer, or return it from your rollout_func"
            )
        accuracy = list(
            self.accuracy(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        )
        if PROMPT_ID_COLUMN in kwargs:
            keys = [str(key) for key in kwargs[PROMPT_ID_COLUMN]]
        else:
            keys = [self.prompt_id_fn(_prompt_text(prompt)) for prompt in prompts]
        correct = correctness_from_scores(accuracy, self.threshold)
        fingerprints: list[FingerprintLike | None] = list(kwargs[FINGERPRINT_COLUMN])
        ids = new_rollout_ids(len(keys), prefix=_step_prefix(kwargs))
        rollouts = [Rollout(*row) for row in zip(ids, keys, correct, fingerprints, strict=True)]
        return rollouts, accuracy

    def _rewards(
        self,
        results: Sequence[ScoreResult],
        rollouts: Sequence[Rollout],
        accuracy: Sequence[float | None],
        kwargs: dict[str, Any],
        seconds: float,
    ) -> list[float | None]:
        """Per completion: shaped minus raw accuracy reward; None where the service gave no verdict."""
        shaping = Shaping.from_results(results, [r.correct for r in rollouts])
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for name, value in {**shaping.metrics(), SCORE_SECONDS_METRIC: seconds}.items():
                log_metric(name, value)
        raw = np.array([0.0 if a is None else a for a in accuracy], dtype=np.float64)
        deltas = shaping.shape(raw) - raw
        return [None if r.status == "error" else float(d) for r, d in zip(results, deltas, strict=True)]


class MedsPenaltyReward(_PenaltyRewardBase[MedsClient]):
    """TRL reward function (blocking) returning the MEDS change to the accuracy reward per completion.

    `accuracy` is your correctness reward function (called with TRL's arguments; a completion is
    correct when it returns at least `threshold`); it is kept as `self.accuracy`, which remembers its
    last batch (list that one among the rewards with a plain `GRPOTrainer`). Prompts are keyed by the
    dataset's `prompt_id` column when there is one, else by `prompt_id_fn` of the prompt text (the last
    user message of a conversational prompt).
    """

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        rollouts, accuracy = self._rollouts(prompts, completions, completion_ids, kwargs)
        started = time.perf_counter()
        results = self.client.score(self.run, rollouts, step=_global_step(kwargs))
        return self._rewards(results, rollouts, accuracy, kwargs, time.perf_counter() - started)


class AsyncMedsPenaltyReward(_PenaltyRewardBase[AsyncMedsClient]):
    """`MedsPenaltyReward` over `AsyncMedsClient`: TRL awaits it concurrently with other async rewards."""

    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        rollouts, accuracy = self._rollouts(prompts, completions, completion_ids, kwargs)
        started = time.perf_counter()
        results = await self.client.score(self.run, rollouts, step=_global_step(kwargs))
        return self._rewards(results, rollouts, accuracy, kwargs, time.perf_counter() - started)


def _prompt_text(prompt: Any) -> str:
    """A standard prompt is its text; a conversational one is keyed by its last user message."""
    if isinstance(prompt, str):
        return prompt
    user = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    content = (user or list(prompt))[-1]["content"]
    if isinstance(content, list):  # typed content blocks
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def _global_step(kwargs: dict[str, Any]) -> int | None:
    state = kwargs.get("trainer_state")
    step = getattr(state, "global_step", None)
    return int(step) if step is not None else None


def _step_prefix(kwargs: dict[str, Any]) -> str:
    step = _global_step(kwargs)
    return f"trl-s{step}-" if step is not None else "trl-"
