"""Trainer integrations: TRL (`.trl`), veRL (`.verl`), OpenRLHF (`.openrlhf`).

Each places the MEDS penalty where the reference implementation does: on the scalar outcome reward,
after the policy's forward pass (which yields the fingerprints) and before the group normalisation
of GRPO-style estimators, keeping the raw correctness for dynamic-sampling filters. Import the
submodule of your trainer; this package imports no trainer itself.
"""

from ._shaping import MedsShaper, Shaping, correctness_from_scores, shape_rewards

__all__ = ["MedsShaper", "Shaping", "correctness_from_scores", "shape_rewards"]
