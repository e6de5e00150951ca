"""veRL actor engine that adds MEDS fingerprints to the log-prob forward pass it already runs.

`MedsFSDPEngine` is veRL's `FSDPEngineWithLMHead` (FSDP1 and FSDP2) plus one output: when the
micro-batch carries the `meds_fingerprint` flag and a `meds_anchor` column (the trainer sets both
for `compute_log_prob` only), it returns `meds_fp`, float32 `[samples, layers]`, next to
`log_probs` and `entropy`. veRL re-nests and reorders it like any model output, and TransferQueue
(v1) or the legacy trainer's tap carries it to the driver. No second forward pass: hooks keep the
anchor rows of each layer (`_capture.AnchorCapture`).

It is registered for veRL's engine lookup under the vendor `meds`: set `VERL_ENGINE_VENDOR=meds` in
the workers' environment. Critic and reward engines keep veRL's own classes.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from ._anchors import ANCHOR_FIELD, FINGERPRINT_FIELD, FINGERPRINT_FLAG
from ._capture import AnchorCapture

ENGINE_VENDOR = "meds"

__all__ = ["ANCHOR_FIELD", "ENGINE_VENDOR", "FINGERPRINT_FIELD", "FINGERPRINT_FLAG", "MedsFSDPEngine"]


@EngineRegistry.register(
    model_type="language_model", backend=["fsdp", "fsdp2"], device=["cuda", "npu"], vendor=ENGINE_VENDOR
)
class MedsFSDPEngine(FSDPEngineWithLMHead):  # type: ignore[misc]
    """`FSDPEngineWithLMHead` that also returns `meds_fp` when a micro-batch asks for it."""

    _meds_capture: AnchorCapture | None = None
    _meds_valid: torch.Tensor | None = None

    def prepare_model_inputs(self, micro_batch: TensorDict) -> tuple[dict[str, Any], dict[str, Any]]:
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        self._meds_valid = None
        if tu.get_non_tensor_data(data=micro_batch, key=FINGERPRINT_FLAG, default=False):
            self._meds_valid = self._arm_fingerprints(micro_batch, model_inputs)
        return model_inputs, output_args

    def prepare_model_outputs(
        self, output: Any, output_args: dict[str, Any], micro_batch: TensorDict, logits_processor_func: Any
    ) -> dict[str, Any]:
        model_output: dict[str, Any] = super().prepare_model_outputs(
            output, output_args, micro_batch, logits_processor_func
        )
        valid, self._meds_valid = self._meds_valid, None
        if valid is not None:
            assert self._meds_capture is not None
            fingerprints = self._meds_capture.take()
            model_output[FINGERPRINT_FIELD] = torch.where(valid.unsqueeze(1).to(fingerprints.device), fingerprints, 0.0)
        return model_output

    def _arm_fingerprints(self, micro_batch: TensorDict, model_inputs: dict[str, Any]) -> torch.Tensor:
        """Point the capture hooks at each sample's anchor row; returns which samples have an anchor."""
        if getattr(self, "use_ulysses_sp", False):
            raise NotImplementedError("MEDS fingerprints need actor.ulysses_sequence_parallel_size=1")
        if self._meds_capture is None:
            self._meds_capture = AnchorCapture(self.module)
        input_ids = micro_batch["input_ids"]
        offsets = input_ids.offsets()
        anchors = micro_batch[ANCHOR_FIELD].to(device=offsets.device, dtype=torch.long).flatten()
        valid = (anchors >= 0) & (anchors + 1 < offsets.diff())
        anchors = torch.where(valid, anchors, 0)
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            rows = offsets[:-1] + anchors  # one packed sequence
        else:
            width = model_inputs["input_ids"].shape[1]  # right-padded to the longest sample
            rows = torch.arange(len(anchors), device=anchors.device) * width + anchors
        targets = input_ids.values()[offsets[:-1] + anchors + 1]
        self._meds_capture.arm(rows, targets)
        result: torch.Tensor = valid
        return result
