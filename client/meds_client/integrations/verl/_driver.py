"""The driver's half of MEDS for veRL, shared by the v1 and the legacy trainer: settings and shaping.

Both trainers hand over, per sample, its rollout id, prompt key, correctness, raw outcome reward and
fingerprint (or none); this module scores them with the service and says by how much each outcome
reward changes (wrong `-p`, correct `r / (1 + p) - r`), before veRL normalises rewards per group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..._client import MedsClient
from ..._prompt_id import prompt_id
from ...fingerprint import Tokenizer
from .._shaping import DEFAULT_CORRECTNESS_THRESHOLD, MedsShaper, Shaping, correctness_from_scores
from ._anchors import NO_ANCHOR

CONFIG_KEY = "meds"
PROMPT_KEYS = ("index", "text")

logger = logging.getLogger("meds_client.verl")


@dataclass(frozen=True)
class MedsSettings:
    """The `meds` section of a veRL config (add it with `+meds.run=...` on the command line).

    - `run`: the service's run id (required; one per training job).
    - `url`: the service (default `$MEDS_URL`, else http://127.0.0.1:8000); the API key is `$MEDS_API_KEY`.
    - `on_error`: `zero` (a batch the service cannot score gets penalty 0 and is counted in
      `meds/error_frac`) or `raise`.
    - `timeout_s`: per request (client default when null).
    - `deadline_s`: the most one step's scoring may take, retries included (client default, 10 s, when null;
      past it the step goes on with penalty 0 under `on_error=zero`).
    - `last_n_layers`: keep the deepest n fingerprint values (the paper uses 14); null keeps all.
    - `threshold`: a sample is correct when its accuracy is at least this.
    - `correctness_key`: the reward function's key for accuracy in `reward_extra_info` (`acc`);
      without it the outcome reward is compared with `threshold`.
    - `prompt_key`: `index` keys memory by the dataset's `extra_info.index` (with `data_source`),
      `text` by `prompt_id()` of the decoded prompt.
    """

    run: str
    url: str | None = None
    on_error: str = "zero"
    timeout_s: float | None = None
    deadline_s: float | None = None
    last_n_layers: int | None = None
    threshold: float = DEFAULT_CORRECTNESS_THRESHOLD
    correctness_key: str = "acc"
    prompt_key: str = "index"

    def __post_init__(self) -> None:
        if not self.run:
            raise ValueError(f"set {CONFIG_KEY}.run (e.g. +{CONFIG_KEY}.run=qwen7b-grpo): the MEDS run of this job")
        if self.prompt_key not in PROMPT_KEYS:
            raise ValueError(f"{CONFIG_KEY}.prompt_key must be one of {PROMPT_KEYS}, not {self.prompt_key!r}")
        if self.on_error not in ("zero", "raise"):
            raise ValueError(f"{CONFIG_KEY}.on_error must be 'zero' or 'raise', not {self.on_error!r}")

    @classmethod
    def from_config(cls, config: Any) -> MedsSettings:
        """Read the `meds` section of a veRL (OmegaConf) config; unknown keys are an error."""
        section = config.get(CONFIG_KEY) if hasattr(config, "get") else None
        if section is None:
            raise ValueError(f"the config has no {CONFIG_KEY!r} section: add +{CONFIG_KEY}.run=<run id>")
        values = dict(section.items()) if isinstance(section, Mapping) or hasattr(section, "items") else {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {CONFIG_KEY} keys {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Samples:
    """One batch as the driver sees it, one entry per (non-padding) sample."""

    rollout_ids: list[str]
    prompt_keys: list[str]
    accuracy: list[float | None]
    rewards: npt.NDArray[np.float64]
    fingerprints: npt.NDArray[np.float32]  # [samples, layers]
    anchors: npt.NDArray[np.int64]  # NO_ANCHOR: no fingerprint


class DriverShaper:
    """Scores batches for one run; the client is opened on first use (in the process that trains)."""

    def __init__(self, settings: MedsSettings) -> None:
        self.settings = settings
        self._shaper: MedsShaper | None = None

    @property
    def shaper(self) -> MedsShaper:
        if self._shaper is None:
            options: dict[str, Any] = {"on_error": self.settings.on_error}
            if self.settings.timeout_s is not None:
                options["timeout"] = self.settings.timeout_s
            if self.settings.deadline_s is not None:
                options["deadline"] = self.settings.deadline_s
            self._shaper = MedsShaper(MedsClient(self.settings.url, **options), self.settings.run)
        return self._shaper

    def deltas(self, samples: Samples, *, step: int | None) -> tuple[npt.NDArray[np.float64], Shaping]:
        """How much each sample's outcome reward changes, and the service's answer."""
        n_layers = self.settings.last_n_layers
        vectors = samples.fingerprints[:, -n_layers:] if n_layers else samples.fingerprints
        fingerprints = [
            row if anchor != NO_ANCHOR else None for row, anchor in zip(vectors, samples.anchors, strict=True)
        ]
        correct = correctness_from_scores(samples.accuracy, self.settings.threshold)
        shaping = self.shaper.score(
            prompt_ids=samples.prompt_keys,
            correct=correct,
            fingerprints=fingerprints,
            rollout_ids=samples.rollout_ids,
            step=step,
        )
        return shaping.shape(samples.rewards) - samples.rewards, shaping

    def prompt_keys(
        self,
        *,
        index: Sequence[Any] | None,
        data_source: Sequence[Any] | None,
        prompts: Sequence[torch.Tensor] | None,
        tokenizer: Tokenizer | None,
    ) -> list[str]:
        """Memory keys: the dataset index (qualified by its data source) or the decoded prompt's `prompt_id`."""
        if self.settings.prompt_key == "index":
            if index is None:
                raise ValueError("prompt_key=index but the batch has no 'index' field: set meds.prompt_key=text")
            sources = data_source if data_source is not None else [None] * len(index)
            return [f"{s}:{i}" if s is not None else str(i) for s, i in zip(sources, index, strict=True)]
        decode = getattr(tokenizer, "decode", None)
        if prompts is None or not callable(decode):
            raise ValueError("prompt_key=text needs the prompts and a tokenizer with decode()")
        return [prompt_id(str(decode(p.tolist(), skip_special_tokens=True))) for p in prompts]


def accuracy_from(
    reward_extra_info: Sequence[Mapping[str, Any] | None] | None,
    column: Sequence[Any] | None,
    rewards: npt.NDArray[np.float64],
    key: str,
) -> list[float | None]:
    """Per sample: `reward_extra_info[key]`, else the top-level `key` column, else the outcome reward."""
    if reward_extra_info is not None and all(info is not None and key in info for info in reward_extra_info):
        return [_as_float(info[key]) for info in reward_extra_info if info is not None]
    if column is not None:
        return [_as_float(v) for v in column]
    return [float(r) for r in rewards]


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)
