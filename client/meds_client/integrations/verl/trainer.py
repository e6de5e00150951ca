"""MEDS on veRL's default (v1, TransferQueue) trainer: `trainer.v1.trainer_mode=meds`.

`MedsPPOTrainer` is veRL's synchronous v1 trainer with two steps changed:

- `_compute_old_log_prob`: writes each sample's anchor (`meds_anchor`) to TransferQueue and asks the
  actor for fingerprints in the log-prob forward pass it runs anyway (`MedsFSDPEngine` answers with
  `meds_fp`, which veRL's worker bridge writes back to TransferQueue); the request is withdrawn
  before the reference pass, so reference log-probs never overwrite the fingerprints.
- `_compute_advantage`: reads `meds_fp`, the anchors, `rm_scores`, the reward function's `acc`
  (`extra_fields.reward_extra_info`) and the dataset `index`, scores them with the service, moves
  each outcome reward (the last token of `rm_scores`) to its shaped value, and only then runs
  veRL's own advantage step, so GRPO normalises the shaped rewards per group. `acc` is untouched for
  DAPO's group filter, which ran earlier, at sampling.

The `meds/*` metrics go to veRL's logger with the step's other metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from ._anchors import ANCHOR_FIELD, FINGERPRINT_FIELD, FINGERPRINT_FLAG, sequence_anchors
from ._driver import DriverShaper, MedsSettings, Samples, accuracy_from

TRAINER_MODE = "meds"
SCORE_FIELD = "rm_scores"
_SAMPLE_FIELDS = ["rm_scores", FINGERPRINT_FIELD, ANCHOR_FIELD, "extra_fields", "index", "data_source", "prompts"]

__all__ = ["TRAINER_MODE", "MedsPPOTrainer"]


@register_trainer(TRAINER_MODE)
class MedsPPOTrainer(PPOTrainerSync):  # type: ignore[misc]
    """veRL's synchronous v1 PPO trainer with MEDS penalties on the outcome reward (see the module doc)."""

    def __init__(self, config: Any) -> None:
        self.meds = DriverShaper(MedsSettings.from_config(config))
        super().__init__(config)

    def _build_replay_buffer(self) -> ReplayBuffer:
        # veRL compares the mode name with "sync" in several places; this trainer is the sync one.
        self.trainer_mode = "sync"
        return super()._build_replay_buffer()

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict[str, Any]) -> KVBatchMeta:
        rollout_correction = self.config.algorithm.get("rollout_correction", None) or {}
        if rollout_correction.get("bypass_mode", False):
            raise ValueError("MEDS needs the actor's log-prob pass: set algorithm.rollout_correction.bypass_mode=false")
        put_anchors(batch, self.tokenizer)
        batch.extra_info[FINGERPRINT_FLAG] = True
        try:
            output: KVBatchMeta = super()._compute_old_log_prob(batch, metrics)
        finally:
            batch.extra_info.pop(FINGERPRINT_FLAG, None)
        output.extra_info.pop(FINGERPRINT_FLAG, None)
        for meta in (batch, output):  # later workers (ref, critic, update) need neither column
            if meta.fields is not None:
                meta.fields = [f for f in meta.fields if f not in (ANCHOR_FIELD, FINGERPRINT_FIELD)]
        return output

    def _compute_advantage(self, batch: KVBatchMeta, metrics: dict[str, Any]) -> KVBatchMeta:
        metrics.update(apply_penalties(batch, self.meds, self.tokenizer, step=self.global_steps))
        result: KVBatchMeta = super()._compute_advantage(batch, metrics)
        return result


def put_anchors(batch: KVBatchMeta, tokenizer: Any) -> None:
    """Find every sample's anchor from its prompt and response tokens and store it as `meds_anchor`."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["prompts", "responses"])
    anchors = sequence_anchors(tokenizer, data["prompts"].unbind(), data["responses"].unbind())
    fields = TensorDict({ANCHOR_FIELD: torch.from_numpy(anchors)}, batch_size=len(batch))
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
    if batch.fields is not None and ANCHOR_FIELD not in batch.fields:
        batch.fields = [*batch.fields, ANCHOR_FIELD]


def apply_penalties(batch: KVBatchMeta, meds: DriverShaper, tokenizer: Any, *, step: int | None) -> dict[str, float]:
    """Score the batch's samples and write their shaped outcome rewards back to `rm_scores`; returns metrics.

    Padding samples (added by veRL to divide the batch evenly) are neither scored nor changed.
    """
    rows = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
    keys = [batch.keys[i] for i in rows]
    wanted = [*_SAMPLE_FIELDS, meds.settings.correctness_key]  # a colocated reward model writes it as a column
    data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=wanted)
    present = set(data.keys())  # TensorDict membership needs keys()
    if FINGERPRINT_FIELD not in present:
        raise RuntimeError(
            f"no {FINGERPRINT_FIELD!r} from the actor: run the workers with VERL_ENGINE_VENDOR=meds "
            "and VERL_USE_EXTERNAL_MODULES=meds_client.integrations.verl.plugin"
        )
    scores = list(data[SCORE_FIELD].unbind())
    rewards = np.array([float(s.sum()) for s in scores], dtype=np.float64)
    extra = _column(data, "extra_fields")
    samples = Samples(
        rollout_ids=keys,
        prompt_keys=meds.prompt_keys(
            index=_column(data, "index"),
            data_source=_column(data, "data_source"),
            prompts=list(data["prompts"].unbind()) if "prompts" in present else None,
            tokenizer=tokenizer,
        ),
        accuracy=accuracy_from(
            [(e or {}).get("reward_extra_info") for e in extra] if extra is not None else None,
            _column(data, meds.settings.correctness_key),
            rewards,
            meds.settings.correctness_key,
        ),
        rewards=rewards,
        fingerprints=np.stack([fp.float().numpy() for fp in data[FINGERPRINT_FIELD].unbind()]),
        anchors=data[ANCHOR_FIELD].numpy(),
    )
    deltas, shaping = meds.deltas(samples, step=step)
    for score, delta in zip(scores, deltas, strict=True):
        score[-1] += float(delta)  # veRL puts the outcome reward on the last response token
    shaped = TensorDict({SCORE_FIELD: torch.nested.as_nested_tensor(scores, layout=torch.jagged)}, batch_size=len(keys))
    tq.kv_batch_put(keys=keys, partition_id=batch.partition_id, fields=shaped)
    return shaping.metrics()


def _column(data: TensorDict, key: str) -> list[Any] | None:
    """A per-sample column as a list (tensors as numbers, non-tensor entries unwrapped); None if absent."""
    if key not in set(data.keys()):
        return None
    column = data[key]
    if isinstance(column, torch.Tensor):
        values: list[Any] = column.tolist()
        return values
    return [getattr(v, "data", v) for v in column]
