"""A run's configuration: the knobs of the MEDS algorithm (docs/architecture.md, "The algorithm"), validated on
construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from .errors import Conflict, InvalidInput
from .types import Group

PenaltyTarget = Literal["wrong", "correct", "both", "none"]
NoisePolicy = Literal["cluster", "ignore"]
Consistency = Literal["exact", "fast"]

MAX_KNN_K = 64
MAX_INT = 2**63 - 1  # the largest integer a config field may hold
MAX_TEXT_CHARS = 65536  # the most characters of a rollout's text a run may keep


@dataclass(frozen=True)
class RunConfig:
    """Defaults reproduce the reference implementation exactly.

    `dim` is the length of the fingerprints the client sends (fixed by the first one when not given);
    `layer_diff` and `last_n_layers` derive the stored features from it.
    """

    # pydantic reads this when the API validates a config body; core does not import pydantic.
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "strict": True}

    alpha: float = 0.1
    beta: float = 0.2
    knn_k: int = 3
    knn_metric: Literal["cosine"] = "cosine"
    min_cluster_size: int = 2
    min_samples: int = 1
    cluster_selection_method: Literal["eom", "leaf"] = "eom"
    cluster_selection_epsilon: float = 0.0
    penalty_target: PenaltyTarget = "wrong"
    noise_policy: NoisePolicy = "cluster"
    layer_diff: bool = False
    last_n_layers: int | None = None
    max_memory_per_key: int | None = None
    consistency: Consistency = "exact"
    dim: int | None = None
    text_max_chars: int = 0  # keep each rollout's text, truncated to this many characters; 0 = keep none

    # Fields that may change on a run that already has memory: they alter no stored state or label
    # (text_max_chars only decides what later rollouts keep).
    MUTABLE_WITH_MEMORY: ClassVar[frozenset[str]] = frozenset({"alpha", "beta", "penalty_target", "text_max_chars"})

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "cluster_selection_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"{name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{name} must be a finite number >= 0")
        _check_int("knn_k", self.knn_k, 1, MAX_KNN_K)
        _check_int("min_cluster_size", self.min_cluster_size, 2, None)
        _check_int("min_samples", self.min_samples, 1, None)
        _check_optional_int("last_n_layers", self.last_n_layers, 1)
        _check_optional_int("max_memory_per_key", self.max_memory_per_key, 2)
        _check_optional_int("dim", self.dim, 1)
        _check_int("text_max_chars", self.text_max_chars, 0, MAX_TEXT_CHARS)
        if self.layer_diff and self.dim is not None and self.dim < 2:
            raise InvalidInput("layer_diff needs fingerprints of at least 2 values (dim >= 2)")
        if self.dim is not None and self.last_n_layers is not None and self.dim < self.needed_dim():
            raise InvalidInput(
                f"dim {self.dim} is too small for last_n_layers {self.last_n_layers}"
                f"{' with layer_diff' if self.layer_diff else ''}: it needs at least {self.needed_dim()} values"
            )
        for name, choices in CHOICES.items():
            _check_choice(name, getattr(self, name), choices)
        if not isinstance(self.layer_diff, bool):
            raise InvalidInput("layer_diff must be a boolean")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidInput(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, patch: Mapping[str, Any], *, has_memory: bool) -> RunConfig:
        """This config with `patch` applied; refuses changes that would alter the results of a run with memory."""
        merged = RunConfig.from_mapping({**self.as_dict(), **patch}) if patch else self
        if has_memory:
            changed = {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(merged, f.name)}
            forbidden = sorted(changed - self.MUTABLE_WITH_MEMORY)
            if forbidden:
                raise Conflict(
                    f"run has memory; changing {', '.join(forbidden)} would alter its results "
                    f"(only {', '.join(sorted(self.MUTABLE_WITH_MEMORY))} may change; delete the run to start over)"
                )
        return merged

    def with_dim(self, dim: int) -> RunConfig:
        return dataclasses.replace(self, dim=dim)

    def check_fingerprint_length(self, dim: int, run: str) -> None:
        """Refuse a first fingerprint too short for this config: `layer_diff` needs 2 values, and `last_n_layers`
        keeps the last n features, so it needs n values (n + 1 with `layer_diff`). Longer ones are cut."""
        if self.layer_diff and dim < 2:
            raise InvalidInput("layer_diff needs fingerprints of at least 2 values")
        if self.last_n_layers is not None:
            needed = self.needed_dim()
            if dim < needed:
                raise InvalidInput(
                    f"fingerprints have {dim} values but run {run!r} keeps the last {self.last_n_layers} "
                    f"(last_n_layers{', after layer_diff' if self.layer_diff else ''}), so it needs at least {needed}"
                )

    def needed_dim(self) -> int:
        """The fewest fingerprint values this config can use: `last_n_layers` (one more with `layer_diff`)."""
        if self.last_n_layers is None:
            return 2 if self.layer_diff else 1
        return self.last_n_layers + 1 if self.layer_diff else self.last_n_layers

    # ---- derived shapes -------------------------------------------------------------------------

    @property
    def stored_dim(self) -> int:
        """Columns kept per stored vector: the raw values the features are derived from, exactly."""
        if self.dim is None:
            raise InvalidInput("dim is not known yet")
        return stored_columns(self.dim, self.layer_diff, self.last_n_layers)

    @property
    def feature_dim(self) -> int:
        return self.stored_dim - 1 if self.layer_diff else self.stored_dim

    def fitted_groups(self) -> frozenset[Group]:
        """Groups whose keys are refitted and judged: those with visible sizes, and `wrong` always, since
        error collapse is measured on every run, observe-only (`penalty_target="none"`) included."""
        return self.sized_groups() | {Group.WRONG}

    def sized_groups(self) -> frozenset[Group]:
        """Groups whose cluster sizes are visible in results (others report size 0)."""
        target = self.penalty_target
        groups = set()
        if target in ("wrong", "both"):
            groups.add(Group.WRONG)
        if target in ("correct", "both"):
            groups.add(Group.CORRECT)
        if target != "none":
            groups.add(Group.UNKNOWN)
        return frozenset(groups)


CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(hint) for name, hint in get_type_hints(RunConfig).items() if get_origin(hint) is Literal
}
"""The allowed values of every field with a fixed set of them, read from the field types (their one home)."""


def stored_columns(dim: int, layer_diff: bool, last_n_layers: int | None) -> int:
    """How many trailing raw values a fingerprint of length `dim` contributes to its features."""
    feature_len = dim - 1 if layer_diff else dim
    if last_n_layers is not None and feature_len >= last_n_layers:
        feature_len = last_n_layers
    return feature_len + 1 if layer_diff else feature_len


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    """An integer from `low` to `high` (at most MAX_INT: what the stores and the JSON encoder hold)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer")
    if value < low or value > (MAX_INT if high is None else high):
        bound = f"between {low} and {high}" if high is not None else f"from {low} to {MAX_INT}"
        raise InvalidInput(f"{name} must be {bound}")


def _check_optional_int(name: str, value: object, low: int) -> None:
    if value is not None:
        _check_int(name, value, low, None)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}")
