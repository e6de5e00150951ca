"""MEDS on veRL's legacy `RayPPOTrainer` (`trainer.use_v1=false`, deprecated by veRL but still shipped).

`MedsRayPPOTrainer._compute_old_log_prob` asks the actor for fingerprints in its log-prob pass
(the same `MedsFSDPEngine` as v1), keeps the `meds_fp` output that veRL's own method rebuilds away,
scores the batch, and shapes `rm_scores` in place. `fit()` holds that very tensor as its reward
and turns it into `token_level_scores`/`token_level_rewards` after this step, so GRPO normalises the
shaped reward. `acc` and the other `reward_extra_info` columns are untouched.

veRL's legacy `TaskRunner` builds `RayPPOTrainer` by name, so start training with this module's
entry point instead of `verl.trainer.main_ppo` (same Hydra config and overrides):
`python -m meds_client.integrations.verl.legacy trainer.use_v1=false +meds.run=... ...`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from verl import DataProto
from verl.trainer import main_ppo_v0
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils import tensordict_utils as tu

from ._anchors import ANCHOR_FIELD, FINGERPRINT_FIELD, FINGERPRINT_FLAG, sequence_anchors
from ._driver import DriverShaper, MedsSettings, Samples, accuracy_from
from ._hook import rollout_ids_from_uids

__all__ = ["MedsRayPPOTrainer", "MedsTaskRunner", "main"]


class MedsRayPPOTrainer(RayPPOTrainer):  # type: ignore[misc]
    """veRL's legacy `RayPPOTrainer` with MEDS penalties on `rm_scores` (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meds = DriverShaper(MedsSettings.from_config(self.config))

    def _compute_old_log_prob(self, batch: DataProto) -> tuple[DataProto, Any]:
        anchors = padded_batch_anchors(batch, self.tokenizer)
        batch.batch[ANCHOR_FIELD] = torch.from_numpy(anchors)
        batch.meta_info[FINGERPRINT_FLAG] = True
        worker_group = self.actor_rollout_wg
        compute_log_prob: Callable[[Any], Any] = worker_group.compute_log_prob
        outputs: list[Any] = []

        def keep_output(data: Any) -> Any:
            output = compute_log_prob(data)
            outputs.append(output)
            return output

        worker_group.compute_log_prob = keep_output  # veRL's method keeps only the keys it knows
        try:
            result: tuple[DataProto, Any] = super()._compute_old_log_prob(batch)
        finally:
            worker_group.compute_log_prob = compute_log_prob
            batch.batch.pop(ANCHOR_FIELD)
            batch.meta_info.pop(FINGERPRINT_FLAG, None)
        fingerprints = tu.get(outputs[-1], FINGERPRINT_FIELD)
        if fingerprints is None:
            raise RuntimeError(
                f"no {FINGERPRINT_FIELD!r} from the actor: run the workers with VERL_ENGINE_VENDOR=meds "
                "and VERL_USE_EXTERNAL_MODULES=meds_client.integrations.verl.plugin"
            )
        metrics = shape_rm_scores(batch, self.meds, self.tokenizer, fingerprints, anchors, self.global_steps)
        step_metrics: dict[str, Any] | None = getattr(self, "_meds_step_metrics", None)
        if step_metrics is not None:
            step_metrics.update(metrics)
        return result

    def _balance_batch(self, batch: DataProto, metrics: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        # The legacy fit() passes its per-step metrics dict here first (trainer.balance_batch, on by
        # default); the MEDS metrics of the step join it in _compute_old_log_prob.
        self._meds_step_metrics = metrics
        super()._balance_batch(batch, metrics, *args, **kwargs)


def padded_batch_anchors(batch: DataProto, tokenizer: Any) -> np.ndarray:
    """Anchors of a padded legacy batch (left-padded prompts, right-padded responses), as indices
    into each sample's unpadded `input_ids`, which is what the actor's engine receives."""
    prompts, responses = batch.batch["prompts"], batch.batch["responses"]
    width = prompts.shape[1]
    mask = batch.batch["attention_mask"].bool()
    prompt_rows = [row[m] for row, m in zip(prompts, mask[:, :width], strict=True)]
    response_rows = [row[m] for row, m in zip(responses, mask[:, width:], strict=True)]
    return sequence_anchors(tokenizer, prompt_rows, response_rows)


def shape_rm_scores(
    batch: DataProto,
    meds: DriverShaper,
    tokenizer: Any,
    fingerprints: torch.Tensor,
    anchors: np.ndarray,
    step: int | None,
) -> dict[str, float]:
    """Score a legacy batch and move each outcome reward in `rm_scores` (in place) to its shaped value."""
    scores: torch.Tensor = batch.batch["rm_scores"]
    non_tensor = batch.non_tensor_batch
    rewards = scores.sum(-1).double().cpu().numpy()
    width = batch.batch["prompts"].shape[1]
    prompt_mask = batch.batch["attention_mask"][:, :width].bool()
    key = meds.settings.correctness_key
    samples = Samples(
        rollout_ids=rollout_ids_from_uids(non_tensor),
        prompt_keys=meds.prompt_keys(
            index=_listed(non_tensor.get("index")),
            data_source=_listed(non_tensor.get("data_source")),
            prompts=[row[m] for row, m in zip(batch.batch["prompts"], prompt_mask, strict=True)],
            tokenizer=tokenizer,
        ),
        accuracy=accuracy_from(None, _listed(non_tensor.get(key)), rewards, key),
        rewards=rewards,
        fingerprints=np.stack([fp.float().numpy() for fp in fingerprints.unbind()]),
        anchors=anchors,
    )
    deltas, shaping = meds.deltas(samples, step=step)
    last = (batch.batch["attention_mask"][:, width:].sum(-1) - 1).clamp(min=0).to(scores.device)
    scores[torch.arange(len(last), device=scores.device), last] += torch.as_tensor(
        deltas, dtype=scores.dtype, device=scores.device
    )
    return shaping.metrics()


def _listed(column: Any) -> list[Any] | None:
    return None if column is None else list(column)


@ray.remote(num_cpus=1)  # type: ignore[misc]
class MedsTaskRunner(main_ppo_v0.TaskRunner.__ray_actor_class__):  # type: ignore[misc,name-defined]
    """veRL's legacy `TaskRunner`, building `MedsRayPPOTrainer` instead of `RayPPOTrainer`."""

    def run(self, config: Any) -> None:
        setattr(main_ppo_v0, "RayPPOTrainer", MedsRayPPOTrainer)  # noqa: B010 - in this runner's process only
        super().run(config)


def main() -> None:
    """`python -m meds_client.integrations.verl.legacy [hydra overrides]`: veRL's `main_ppo`, legacy trainer, MEDS."""
    import hydra
    from verl.trainer import main_ppo
    from verl.utils.device import auto_set_device

    config_dir = os.path.join(os.path.dirname(main_ppo.__file__), "config")

    @hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)
    def run(config: Any) -> None:
        if config.trainer.use_v1:
            raise ValueError("this entry point runs the legacy trainer: set trainer.use_v1=false")
        MedsSettings.from_config(config)  # fail before any worker starts
        auto_set_device(config)
        main_ppo.run_ppo(config, task_runner_class=MedsTaskRunner)

    run()


if __name__ == "__main__":
    main()
