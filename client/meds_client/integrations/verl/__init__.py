"""MEDS for veRL (0.9.1).

- veRL's default trainer (v1, TransferQueue): `trainer.v1.trainer_mode=meds` selects `MedsPPOTrainer`
  (`.trainer`), and `MedsFSDPEngine` (`.engine`, `VERL_ENGINE_VENDOR=meds`) returns fingerprints
  from the actor's log-prob pass. Both register when `.plugin` is imported
  (`VERL_USE_EXTERNAL_MODULES=meds_client.integrations.verl.plugin`).
- veRL's legacy `RayPPOTrainer`: `MedsRayPPOTrainer` and the entry point in `.legacy`.
- A trainer of your own: `compute_fingerprints` and `MedsVerlHook` on `DataProto` batches (this
  module; it imports no veRL).
"""

from ._hook import FINGERPRINT_KEY, MedsVerlHook, compute_fingerprints, response_anchor_positions

__all__ = ["FINGERPRINT_KEY", "MedsVerlHook", "compute_fingerprints", "response_anchor_positions"]
