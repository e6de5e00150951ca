"""Layer-logit fingerprints of responses, computed from a Hugging Face causal LM (docs/architecture.md, "Fingerprints").

A response's fingerprint is read at the token of `{` in its last `\\boxed{` (the *anchor* p): for each
decoder layer l, the logit that the output embedding gives the token actually sampled at p+1 when
applied to that layer's hidden state at p, `lm_head(h_l[p])[input_ids[p+1]]`. One float per layer,
with no final norm on intermediate layers (the last entry is the model's real logit), as in the
reference implementation. Needs the `fingerprint` extra (torch, transformers).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

BOXED_TEXT = "\\boxed{"
FALLBACK_WINDOW = 10
"""After a token containing `boxed`, the `{` is looked for in that token and the next 9 (reference)."""
DEFAULT_BATCH_SIZE = 8

__all__ = [
    "BOXED_TEXT",
    "anchor_mask",
    "boxed_token_ids",
    "find_boxed_anchor",
    "fingerprint_sequences",
    "layer_logit_fingerprints",
    "output_embedding",
]


class Tokenizer(Protocol):
    """The two tokenizer methods the anchor search needs (any HF tokenizer has them)."""

    def encode(self, text: str, /, *, add_special_tokens: bool = ...) -> Any: ...

    def convert_ids_to_tokens(self, ids: list[int], /) -> Any: ...


def boxed_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The token sequence of `\\boxed{` (no special tokens), searched for in responses."""
    return list(tokenizer.encode(BOXED_TEXT, add_special_tokens=False))


def find_boxed_anchor(
    token_ids: Sequence[int] | torch.Tensor, tokenizer: Tokenizer, *, pattern: list[int] | None = None
) -> int | None:
    """Index in `token_ids` of the `{` token of the last `\\boxed{`, or None.

    `token_ids` is one response without padding. The token sequence of `\\boxed{` is searched for
    backwards and the anchor is its last token. Fallback (when a tokenizer merges `\\boxed{` with its
    neighbours): the last token whose text contains `boxed` (case-insensitive), then the first token
    containing `{` from that token on within 10 tokens. Token text is as the tokenizer spells it
    (`convert_ids_to_tokens`), as in the reference. An anchor on the very last token has no sampled
    token after it, so it gives None too. Callers searching many responses pass `pattern`
    (`boxed_token_ids(tokenizer)`, computed once) to skip encoding it again for each.
    """
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [int(t) for t in token_ids]
    anchor = _find_sequence_end(ids, boxed_token_ids(tokenizer) if pattern is None else pattern)
    if anchor is None:
        anchor = _find_by_token_text(list(tokenizer.convert_ids_to_tokens(ids)))
    if anchor is None or anchor >= len(ids) - 1:
        return None
    return anchor


def anchor_mask(anchor_positions: Sequence[int | None]) -> npt.NDArray[np.bool_]:
    """Which rows have an anchor, i.e. which rows of `layer_logit_fingerprints` are fingerprints."""
    return np.array([p is not None and p >= 0 for p in anchor_positions], dtype=bool)


def output_embedding(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to vocabulary logits (`lm_head`, or `embed_out` for GPT-NeoX)."""
    model = _unwrap(model)
    getter = getattr(model, "get_output_embeddings", None)
    candidates = [
        getter() if callable(getter) else None,
        getattr(model, "lm_head", None),
        getattr(model, "embed_out", None),
    ]
    for head in candidates:
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
            return head
    raise TypeError(f"{type(model).__name__} has no output embedding (lm_head or embed_out) with a weight")


@torch.no_grad()
def layer_logit_fingerprints(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    anchor_positions: Sequence[int | None] | torch.Tensor,
    last_n_layers: int | None = None,
) -> npt.NDArray[np.float32]:
    """Fingerprints of a padded batch: float32 array of shape [batch, layers].

    `anchor_positions[i]` indexes row i of `input_ids` as given (left or right padding both work;
    position ids are derived from `attention_mask`). Rows whose anchor is None (or negative) are not
    run through the model and come back as zeros: they are not fingerprints, select real rows with
    `anchor_mask(anchor_positions)`. Only one row of the output embedding is gathered per row (the
    target token's, plus its bias), so no full-vocabulary logits are materialised for any layer; the
    dot products are taken in float32. Runs on the model's device, without gradients, in eval mode
    (restored afterwards), and feeds the model only the columns up to the last anchor + 1.
    """
    anchors = _anchor_tensor(anchor_positions, input_ids, attention_mask)
    rows = torch.nonzero(anchors >= 0).flatten()
    fingerprints = np.zeros((input_ids.shape[0], _num_layers(model)), dtype=np.float32)
    if rows.numel() > 0:
        on_input = rows.to(input_ids.device)
        fingerprints[rows.numpy()] = _fingerprint_rows(
            model, input_ids[on_input], attention_mask[on_input], anchors[rows]
        )
    return fingerprints[:, -last_n_layers:] if last_n_layers else fingerprints


def fingerprint_sequences(
    model: nn.Module,
    tokenizer: Tokenizer,
    sequences: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    *,
    last_n_layers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[npt.NDArray[np.float32] | None]:
    """Fingerprints of unpadded prompt+response token lists; None where a response has no anchor.

    `response_starts[i]` is where the response begins in `sequences[i]` (the prompt's length); the
    anchor is searched for in the response only. Rows are batched by similar length (`batch_size`
    rows per forward pass) to bound memory and padding.
    """
    if len(sequences) != len(response_starts):
        raise ValueError("sequences and response_starts must have the same length")
    pattern = boxed_token_ids(tokenizer)
    anchors = [
        _absolute_anchor(seq, start, tokenizer, pattern) for seq, start in zip(sequences, response_starts, strict=True)
    ]
    results: list[npt.NDArray[np.float32] | None] = [None] * len(sequences)
    with_anchor = sorted((i for i, p in enumerate(anchors) if p is not None), key=lambda i: len(sequences[i]))
    for start in range(0, len(with_anchor), batch_size):
        batch = with_anchor[start : start + batch_size]
        input_ids, attention_mask = _right_pad([sequences[i] for i in batch])
        vectors = layer_logit_fingerprints(model, input_ids, attention_mask, [anchors[i] for i in batch], last_n_layers)
        for i, vector in zip(batch, vectors, strict=True):
            results[i] = vector
    return results


# -- internals ---------------------------------------------------------------------------------


def _fingerprint_rows(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, anchors: torch.Tensor
) -> npt.NDArray[np.float32]:
    """[rows, layers] for rows that all have an anchor (see `layer_logit_fingerprints`)."""
    weight, bias = _head_parameters(output_embedding(model))
    device = weight.device
    input_ids, attention_mask, positions = input_ids.to(device), attention_mask.to(device), anchors.to(device)
    index = torch.arange(len(anchors), device=device)
    targets = input_ids[index, positions + 1]
    width = int(anchors.max()) + 1  # later tokens cannot change a causal model's state at the anchors
    kwargs = _forward_kwargs(model, input_ids[:, :width], attention_mask[:, :width])
    with _eval_mode(model):
        hidden_states = model(**kwargs).hidden_states[1:]  # the embedding output is not a layer
    picked = torch.stack([h[index, positions] for h in hidden_states])  # [layers, rows, hidden]
    with torch.autocast(device_type=device.type, enabled=False):  # float32 dot products, even under autocast
        logits = torch.einsum("lrh,rh->rl", picked.float(), weight[targets].float())
        if bias is not None:
            logits = logits + bias[targets].float().unsqueeze(1)
    result: npt.NDArray[np.float32] = logits.cpu().numpy().astype(np.float32)
    return result


def _head_parameters(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = head.weight
    bias = getattr(head, "bias", None)
    assert isinstance(weight, torch.Tensor)  # checked by output_embedding
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _forward_kwargs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for a hidden-states-only forward pass, using what this model's forward accepts."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "output_hidden_states": True,
        "use_cache": False,
        "return_dict": True,
    }
    parameters = inspect.signature(_unwrap(model).forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "position_ids" in parameters or accepts_any:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1  # the logits are not used; skip the full-vocabulary projection
    return kwargs


def _anchor_tensor(
    anchor_positions: Sequence[int | None] | torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Anchors as a CPU long tensor (-1 for none), checked against the batch."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError("input_ids and attention_mask must both have shape [batch, seq_len]")
    if isinstance(anchor_positions, torch.Tensor):
        anchors = anchor_positions.detach().to("cpu", torch.long).flatten()
    else:
        anchors = torch.tensor([-1 if p is None else int(p) for p in anchor_positions], dtype=torch.long)
    if anchors.numel() != input_ids.shape[0]:
        raise ValueError(f"{anchors.numel()} anchor positions for a batch of {input_ids.shape[0]} rows")
    anchors = torch.where(anchors < 0, torch.full_like(anchors, -1), anchors)
    rows = torch.nonzero(anchors >= 0).flatten()
    if rows.numel() > 0:
        _check_anchors(anchors[rows], attention_mask.detach().cpu()[rows], input_ids.shape[1])
    return anchors


def _check_anchors(anchors: torch.Tensor, attention_mask: torch.Tensor, seq_len: int) -> None:
    if int(anchors.max()) >= seq_len - 1:
        raise ValueError("an anchor position must leave a next token in its row (anchor < seq_len - 1)")
    index = torch.arange(len(anchors))
    if not bool(attention_mask[index, anchors].all() and attention_mask[index, anchors + 1].all()):
        raise ValueError("an anchor and the token after it must both be real (attention_mask == 1) tokens")


def _absolute_anchor(
    sequence: Sequence[int], response_start: int, tokenizer: Tokenizer, pattern: list[int]
) -> int | None:
    anchor = find_boxed_anchor(sequence[response_start:], tokenizer, pattern=pattern)
    return None if anchor is None else response_start + anchor


def _find_sequence_end(ids: list[int], pattern: list[int]) -> int | None:
    """Index of the last token of the last occurrence of `pattern` in `ids`."""
    if not pattern:
        return None
    width = len(pattern)
    for start in range(len(ids) - width, -1, -1):
        if ids[start : start + width] == pattern:
            return start + width - 1
    return None


def _find_by_token_text(tokens: Sequence[str | None]) -> int | None:
    for index in range(len(tokens) - 1, -1, -1):
        token = tokens[index]
        if not token or "boxed" not in token.lower():
            continue
        for candidate in range(index, min(index + FALLBACK_WINDOW, len(tokens))):
            if "{" in (tokens[candidate] or ""):
                return candidate
    return None


def _right_pad(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def _num_layers(model: nn.Module) -> int:
    config: Any = getattr(_unwrap(model), "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()  # multimodal configs keep the decoder's under text_config
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise TypeError(
            f"cannot tell the number of decoder layers of {type(model).__name__} (config.num_hidden_layers)"
        )
    return layers


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP/accelerate wrapper (which keep it as `.module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the fingerprint pass, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
