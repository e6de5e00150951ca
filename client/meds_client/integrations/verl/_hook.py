"""MEDS for a veRL trainer of your own: two calls on `DataProto` batches (the packaged trainers use them too).

The reference (Linxi000/MEDS, a veRL fork) fingerprints responses in the actor's `compute_log_prob`
pass, then, on the driver, assigns clusters and subtracts the penalty from each wrong response's
outcome score inside its advantage estimator, before GRPO normalises scores per group; the raw
`acc` that DAPO's group filter reads is left alone. Here the same happens in two calls:

1. `compute_fingerprints(model, batch, tokenizer)`: wherever the actor model lives (inside your
   worker's `compute_log_prob`, or on the driver for small models), write one fingerprint per
   response to `batch.non_tensor_batch["meds_fingerprint"]`. Fingerprints computed elsewhere (the
   reference's patched actor writes `layer_logits`) work too: set `fingerprint_key`.
2. `MedsVerlHook(client, run, tokenizer=...)(batch, step=global_steps)`, on the driver anywhere
   after the fingerprints exist and before `compute_advantage`: scores the batch and adds the MEDS
   change of each response's outcome reward (wrong: `-p`; correct: `r/(1+p) - r`) to the last
   response token of `token_level_rewards`, or of `rm_scores` when veRL has not built
   `token_level_rewards` yet (the legacy `fit()` builds it from `rm_scores`, the very same tensor,
   only inside its advantage block). Any outcome estimator (GRPO, DAPO, RLOO, ...) then normalises
   the shaped reward. `acc` keeps the raw values.

The batch is duck-typed: anything with veRL's `DataProto` layout (`.batch` mapping of tensors with
`prompts`, `responses`, `input_ids`, `attention_mask`, `token_level_rewards` or `rm_scores`; `.non_tensor_batch`
mapping of numpy arrays) works, so this module does not import veRL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ..._client import MedsClient
from ..._prompt_id import prompt_id
from ...fingerprint import DEFAULT_BATCH_SIZE, Tokenizer, layer_logit_fingerprints
from .._shaping import DEFAULT_CORRECTNESS_THRESHOLD, MedsShaper, Shaping, correctness_from_scores, new_rollout_ids
from ._anchors import ANCHOR_FIELD, FINGERPRINT_FIELD, NO_ANCHOR, sequence_anchors

FINGERPRINT_KEY = "meds_fingerprint"
PENALTY_KEY = "meds_penalty"
CLUSTER_SIZE_KEY = "meds_cluster_size"
STATUS_KEY = "meds_status"
REWARD_KEYS = ("token_level_rewards", "rm_scores")
SCORE_KEYS = ("token_level_scores", "rm_scores")

__all__ = [
    "FINGERPRINT_KEY",
    "MedsVerlHook",
    "compute_fingerprints",
    "response_anchor_positions",
    "rollout_ids_from_uids",
]


@runtime_checkable
class DataProtoLike(Protocol):
    """The parts of `verl.DataProto` used here."""

    batch: Any
    non_tensor_batch: dict[str, Any]


class TensorDictLike(Protocol):
    """The parts of a `tensordict.TensorDict` used here."""

    def __getitem__(self, key: str, /) -> Any: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...


class DecodingTokenizer(Tokenizer, Protocol):
    def decode(self, ids: list[int], /, *, skip_special_tokens: bool = ...) -> Any: ...


def response_anchor_positions(batch: DataProtoLike, tokenizer: Tokenizer) -> npt.NDArray[np.int64]:
    """Per row, the anchor as an index into `input_ids` (prompt width + position in the response), -1 if none.

    The anchor is searched for in the valid (unpadded) response tokens only, so an anchor is never
    followed by padding.
    """
    responses = batch.batch["responses"]
    prompt_width = batch.batch["input_ids"].shape[1] - responses.shape[1]
    lengths = _response_mask(batch).sum(-1).tolist()
    valid = [row[: int(length)] for row, length in zip(responses, lengths, strict=True)]
    anchors = sequence_anchors(tokenizer, [row[:0] for row in valid], valid)
    return np.where(anchors == NO_ANCHOR, NO_ANCHOR, anchors + prompt_width)


def compute_fingerprints(
    model: nn.Module,
    batch: DataProtoLike | TensorDictLike,
    tokenizer: Tokenizer,
    *,
    last_n_layers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    key: str = FINGERPRINT_KEY,
) -> None:
    """Fingerprint every response of `batch` with `model`, in place.

    A padded `DataProto` (the driver's layout) gets `non_tensor_batch[key]`: an object array holding
    a float32 vector per response, or None for a response without `\\boxed{`. A worker's
    `TensorDict` with nested (jagged) `input_ids` and `responses` (veRL v1's worker layout) gets the
    columns the packaged trainer reads, `meds_fp` (`[samples, layers]`, zeros without an anchor) and
    `meds_anchor` (-1 without one). Rows go through the model `batch_size` at a time.
    """
    if not isinstance(batch, DataProtoLike):
        _fingerprint_nested(model, batch, tokenizer, last_n_layers=last_n_layers, batch_size=batch_size)
        return
    anchors = response_anchor_positions(batch, tokenizer)
    input_ids, attention_mask = batch.batch["input_ids"], batch.batch["attention_mask"]
    column = np.empty(len(anchors), dtype=object)
    for start in range(0, len(anchors), batch_size):
        rows = slice(start, start + batch_size)
        chunk = anchors[rows].tolist()
        vectors = layer_logit_fingerprints(model, input_ids[rows], attention_mask[rows], chunk, last_n_layers)
        for offset, (anchor, vector) in enumerate(zip(chunk, vectors, strict=True)):
            column[start + offset] = vector if anchor >= 0 else None
    batch.non_tensor_batch[key] = column


def _fingerprint_nested(
    model: nn.Module, batch: TensorDictLike, tokenizer: Tokenizer, *, last_n_layers: int | None, batch_size: int
) -> None:
    sequences = list(batch["input_ids"].unbind())
    responses = list(batch["responses"].unbind())
    prompts = [seq[: len(seq) - len(resp)] for seq, resp in zip(sequences, responses, strict=True)]
    anchors = sequence_anchors(tokenizer, prompts, responses)
    vectors = []
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start : start + batch_size]
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        chunk = anchors[start : start + batch_size].tolist()
        vectors.append(layer_logit_fingerprints(model, padded, mask, chunk, last_n_layers))
    batch[FINGERPRINT_FIELD] = torch.from_numpy(np.concatenate(vectors))
    batch[ANCHOR_FIELD] = torch.from_numpy(anchors)


class MedsVerlHook:
    """Scores a veRL batch and shapes its outcome rewards in place; returns `meds/*` metrics.

    The rewards shaped are `token_level_rewards`, else `rm_scores` (see the module doc).
    Correctness: `non_tensor_batch[correctness_key]` (the reward manager's `acc`) when present,
    else the summed `token_level_scores` (or `rm_scores`), compared with `threshold`. Prompt keys: the
    `prompt_id_key` column when present, else `prompt_id_fn` of the decoded prompt (needs
    `tokenizer`). Rollout ids: the row's `uid` (fresh per prompt per step in veRL) plus its index in
    the group, so a retried request is recognised by the service.
    """

    def __init__(
        self,
        client: MedsClient,
        run: str,
        *,
        tokenizer: DecodingTokenizer | None = None,
        fingerprint_key: str = FINGERPRINT_KEY,
        correctness_key: str = "acc",
        prompt_id_key: str = "prompt_id",
        threshold: float = DEFAULT_CORRECTNESS_THRESHOLD,
        prompt_id_fn: Callable[[str], str] = prompt_id,
    ) -> None:
        self.shaper = MedsShaper(client, run, prompt_id_fn=prompt_id_fn)
        self.tokenizer = tokenizer
        self.fingerprint_key = fingerprint_key
        self.correctness_key = correctness_key
        self.prompt_id_key = prompt_id_key
        self.threshold = threshold

    def __call__(self, batch: DataProtoLike, *, step: int | None = None) -> dict[str, float]:
        fingerprints = list(batch.non_tensor_batch[self.fingerprint_key])
        shaping = self.shaper.score(
            prompt_ids=self._prompt_ids(batch),
            correct=self._correctness(batch),
            fingerprints=fingerprints,
            rollout_ids=rollout_ids_from_uids(batch.non_tensor_batch),
            step=step,
        )
        _add_to_last_token(batch, shaping)
        batch.non_tensor_batch[PENALTY_KEY] = shaping.penalties
        batch.non_tensor_batch[CLUSTER_SIZE_KEY] = shaping.cluster_sizes
        batch.non_tensor_batch[STATUS_KEY] = np.array(shaping.statuses, dtype=object)
        return shaping.metrics()

    def _correctness(self, batch: DataProtoLike) -> list[bool | None]:
        if self.correctness_key in batch.non_tensor_batch:
            scores = [_as_float(v) for v in batch.non_tensor_batch[self.correctness_key]]
        else:
            scores = batch.batch[_present(batch, SCORE_KEYS)].sum(-1).tolist()
        return correctness_from_scores(scores, self.threshold)

    def _prompt_ids(self, batch: DataProtoLike) -> list[str]:
        if self.prompt_id_key in batch.non_tensor_batch:
            return [str(key) for key in batch.non_tensor_batch[self.prompt_id_key]]
        if self.tokenizer is None:
            raise ValueError(f"no {self.prompt_id_key!r} column: pass tokenizer= to key prompts by their text")
        prompts, mask = batch.batch["prompts"], batch.batch["attention_mask"][:, : batch.batch["prompts"].shape[1]]
        texts = [
            str(self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True))
            for row, m in zip(prompts, mask, strict=True)
        ]
        return self.shaper.prompt_ids(texts)


def _add_to_last_token(batch: DataProtoLike, shaping: Shaping) -> None:
    """Change each row's outcome reward (the sum over tokens) to its shaped value at the last valid token."""
    rewards: torch.Tensor = batch.batch[_present(batch, REWARD_KEYS)]
    raw = rewards.sum(-1).double().cpu().numpy()
    delta = torch.as_tensor(shaping.shape(raw) - raw, dtype=rewards.dtype, device=rewards.device)
    # The last response token (responses are right-padded; tool tokens of multi-turn responses count).
    tail = batch.batch["attention_mask"][:, -rewards.shape[1] :]
    last = (tail.sum(-1) - 1).clamp(min=0).to(rewards.device)
    rewards[torch.arange(len(last), device=rewards.device), last] += delta


def _present(batch: DataProtoLike, keys: tuple[str, ...]) -> str:
    present = set(batch.batch.keys())
    for key in keys:
        if key in present:
            return key
    raise KeyError(f"the batch has none of {list(keys)}")


def _response_mask(batch: DataProtoLike) -> torch.Tensor:
    if "response_mask" in batch.batch.keys():  # noqa: SIM118 - TensorDict membership needs keys()
        mask: torch.Tensor = batch.batch["response_mask"]
        return mask
    width = batch.batch["responses"].shape[1]
    tail: torch.Tensor = batch.batch["attention_mask"][:, -width:]
    return tail


def rollout_ids_from_uids(non_tensor_batch: Mapping[str, Any]) -> list[str]:
    """Rollout ids `uid/k` (the k-th response of veRL's per-step prompt uid); random ids without uids."""
    if "uid" not in non_tensor_batch:
        n = len(next(iter(non_tensor_batch.values()))) if non_tensor_batch else 0
        return new_rollout_ids(n, prefix="verl-")
    seen: dict[str, int] = {}
    ids = []
    for uid in non_tensor_batch["uid"]:
        seen[str(uid)] = seen.get(str(uid), -1) + 1
        ids.append(f"{uid}/{seen[str(uid)]}")
    return ids


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)
