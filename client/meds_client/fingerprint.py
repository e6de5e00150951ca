"""Layer-logit fingerprints of responses, computed from a Hugging Face causal LM (docs/architecture.md, "Fingerprints").

A response's fingerprint is read at its *anchor* p, the token that holds the `{` of the last
`\\boxed{` of the response: for each decoder layer l, the logit that the output embedding gives the
token actually sampled at p+1 when applied to that layer's hidden state at p,
`lm_head(h_l[p])[input_ids[p+1]]`. One float per layer, with no final norm on intermediate layers
(the last entry is the model's real logit), as in the reference implementation. Needs the
`fingerprint` extra (torch, transformers).

One module over the usual ~400 lines: the anchor search and the hook-based forward pass are the two
halves of one computation, kept together so that the anchor rules and the rows they select stay in step.

Anchor rules. The reference encodes `\\boxed{` and looks for that token sequence, with a fallback on
token texts; both depend on how a tokenizer splits the string (byte-level BPE glues a leading space to
the backslash, so a second box is missed). Here the anchor is found in the decoded *text* and mapped
back to the token that holds the character, so every tokenizer gives the same answer:

- the last match of `\\boxed{` in the response text wins (so of nested boxes, the innermost last one;
  nested braces inside the box do not matter: the anchor is the `{` right after `boxed`);
- whitespace between `\\`, `boxed` and `{` is allowed: the reference's fallback accepts `\\boxed {`,
  and WordPiece-style decoders put spaces between the three tokens;
- `\\fbox{` and other commands are not anchors (the reference looks for `boxed` only), and the match
  is case-sensitive, as LaTeX is;
- when the response has no `\\boxed{` but the prompt text ends in one (an answer prefill), the anchor
  is the prompt token that holds that `{`: the first sampled token is then the one fingerprinted;
- an anchor on the very last token has no sampled token after it (a truncated response): no anchor.

Sharded and wrapped models. The hidden states of the anchor rows are captured by forward hooks on
the decoder layers (full hidden states of every layer are never kept), and the rows of the output
embedding that are needed are read inside its own forward call, where FSDP (1 and 2) has gathered
it; DDP, `torch.compile` and accelerate wrappers are looked through. On a sharded model every rank
must run the same number of forward passes, so `fingerprint_sequences` agrees on that number with
the other ranks (one all-reduce) and pads with a one-token pass.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

logger = logging.getLogger("meds_client")

BOXED_TEXT = "\\boxed{"
ANCHOR_PATTERN = re.compile(r"\\\s*boxed\s*\{")
"""The text searched for; see the module docstring for why whitespace is allowed."""
PROMPT_TAIL_TOKENS = 16
"""Prompt tokens decoded together with the response, to see a `\\boxed{` that the prompt ends in."""
DEFAULT_BATCH_SIZE = 8
WARN_MISSING_FRACTION = 0.5
"""`response_anchors` warns when more than this fraction of a batch has no anchor."""

__all__ = [
    "BOXED_TEXT",
    "anchor_mask",
    "boxed_token_ids",
    "find_boxed_anchor",
    "fingerprint_sequences",
    "layer_logit_fingerprints",
    "output_embedding",
    "response_anchor",
    "response_anchors",
]


class Tokenizer(Protocol):
    """What the anchor search needs from a tokenizer (any Hugging Face tokenizer has it)."""

    def decode(self, token_ids: list[int], /, *, skip_special_tokens: bool = ...) -> Any: ...


# -- anchors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anchor:
    index: int | None
    missing: Literal["none", "no_box", "at_end"] = "none"


def response_anchor(tokenizer: Tokenizer, sequence: Sequence[int] | torch.Tensor, response_start: int) -> int | None:
    """Index in `sequence` (prompt + response token ids, unpadded) of the anchor token, or None.

    The anchor is the token holding the `{` of the last `\\boxed{` of the response text, found in the
    decoded text (so it does not depend on how the tokenizer splits `\\boxed{`); if the response has
    none and the prompt text ends in `\\boxed{`, the prompt token holding that `{`. None when there
    is no such token, or when it is the last token (nothing sampled follows it).
    """
    return _locate(tokenizer, _ids(sequence), response_start).index


def response_anchors(
    tokenizer: Tokenizer, sequences: Sequence[Sequence[int] | torch.Tensor], response_starts: Sequence[int]
) -> list[int | None]:
    """`response_anchor` of each sequence; logs one warning when most of the batch has no anchor."""
    if len(sequences) != len(response_starts):
        raise ValueError("sequences and response_starts must have the same length")
    found = [_locate(tokenizer, _ids(seq), start) for seq, start in zip(sequences, response_starts, strict=True)]
    missing = [a.missing for a in found if a.index is None]
    if found and len(missing) > WARN_MISSING_FRACTION * len(found):
        logger.warning(
            "%d of %d responses have no fingerprint anchor and will not be scored by MEDS: %d contain no "
            "`\\boxed{` (and their prompt does not end in one), %d end right at the `{` with nothing sampled "
            "after it (truncated). Ask for the final answer in \\boxed{} or raise the response length.",
            len(missing),
            len(found),
            missing.count("no_box"),
            missing.count("at_end"),
        )
    return [a.index for a in found]


def find_boxed_anchor(
    token_ids: Sequence[int] | torch.Tensor, tokenizer: Tokenizer, *, pattern: list[int] | None = None
) -> int | None:
    """Index in `token_ids` (one response, no prompt, no padding) of its anchor, or None.

    The same search as `response_anchor` with an empty prompt. `pattern` is accepted for
    compatibility and ignored: the search works on text, not on a token sequence.
    """
    del pattern
    return response_anchor(tokenizer, token_ids, 0)


def boxed_token_ids(tokenizer: Any) -> list[int]:
    """The token sequence of `\\boxed{` (no special tokens) with this tokenizer."""
    return list(tokenizer.encode(BOXED_TEXT, add_special_tokens=False))


def anchor_mask(anchor_positions: Sequence[int | None]) -> npt.NDArray[np.bool_]:
    """Which rows have an anchor, i.e. which rows of `layer_logit_fingerprints` are fingerprints."""
    return np.array([p is not None and p >= 0 for p in anchor_positions], dtype=bool)


def _ids(sequence: Sequence[int] | torch.Tensor) -> list[int]:
    return sequence.tolist() if isinstance(sequence, torch.Tensor) else [int(t) for t in sequence]


def _locate(tokenizer: Tokenizer, ids: list[int], response_start: int) -> _Anchor:
    """The anchor of one sequence, and why there is none.

    Decoding is linear in the tokens decoded, so the search decodes growing windows that end at the
    last token (an answer is usually near the end), and then bisects on prefixes of the first window
    whose last match does not touch its first two tokens (whose text may depend on what precedes).
    """
    n = len(ids)
    if not 0 <= response_start <= n:
        raise ValueError(f"response_start {response_start} is outside a sequence of {n} tokens")
    if response_start == n:
        return _Anchor(None, "no_box")
    floor = max(0, response_start - PROMPT_TAIL_TOKENS)
    width = 64
    while True:
        start = max(floor, n - width)
        text = _decode(tokenizer, ids[start:])
        matches = ANCHOR_PATTERN.findall(text)
        if matches and (start == floor or _last_match_start(text) >= len(_decode(tokenizer, ids[start : start + 2]))):
            break
        if start == floor:
            return _Anchor(None, "no_box")
        width *= 4
    anchor = _first_prefix_with(tokenizer, ids, start, len(matches)) - 1
    if anchor < response_start - 1:  # the last `\boxed{` is inside the prompt, not at its end
        return _Anchor(None, "no_box")
    if anchor >= n - 1:
        return _Anchor(None, "at_end")
    return _Anchor(anchor)


def _first_prefix_with(tokenizer: Tokenizer, ids: list[int], start: int, count: int) -> int:
    """The smallest end such that the text of `ids[start:end]` holds `count` matches (bisection)."""
    low, high = start + 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if len(ANCHOR_PATTERN.findall(_decode(tokenizer, ids[start:middle]))) >= count:
            high = middle
        else:
            low = middle + 1
    return low


def _last_match_start(text: str) -> int:
    return [m.start() for m in ANCHOR_PATTERN.finditer(text)][-1]


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=False))


# -- layer logits ------------------------------------------------------------------------------


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
    `anchor_mask(anchor_positions)`. Only the target tokens' rows of the output embedding are read
    (plus their bias), so no full-vocabulary logits are materialised for any layer; the dot products
    are taken in float32. Runs on the model's device, without gradients, in eval mode (restored
    afterwards), and feeds the model only the columns up to the last anchor + 1. On a sharded model
    this is a collective call: every rank calls it (a rank without anchors runs a one-token pass).
    """
    anchors = _anchor_tensor(anchor_positions, input_ids, attention_mask)
    rows = torch.nonzero(anchors >= 0).flatten()
    fingerprints = np.zeros((input_ids.shape[0], _num_layers(model)), dtype=np.float32)
    if rows.numel() > 0:
        on_input = rows.to(input_ids.device)
        fingerprints[rows.numpy()] = _fingerprint_rows(
            model, input_ids[on_input], attention_mask[on_input], anchors[rows]
        )
    elif _process_group(model) is not None:
        _idle_pass(model)
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

    `response_starts[i]` is where the response begins in `sequences[i]` (the prompt's length); anchors
    follow `response_anchor`. Rows are batched by similar length (`batch_size` rows per forward pass)
    to bound memory and padding. On a sharded model, a collective call (see the module docstring).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    anchors = response_anchors(tokenizer, sequences, response_starts)
    results: list[npt.NDArray[np.float32] | None] = [None] * len(sequences)
    with_anchor = sorted((i for i, p in enumerate(anchors) if p is not None), key=lambda i: len(sequences[i]))
    batches = [with_anchor[start : start + batch_size] for start in range(0, len(with_anchor), batch_size)]
    idle_passes = _passes_of_slowest_rank(model, len(batches)) - len(batches)  # before any pass: they pair up
    for batch in batches:
        input_ids, attention_mask = _right_pad([sequences[i] for i in batch])
        vectors = layer_logit_fingerprints(model, input_ids, attention_mask, [anchors[i] for i in batch], last_n_layers)
        for i, vector in zip(batch, vectors, strict=True):
            results[i] = vector
    for _ in range(idle_passes):
        _idle_pass(model)
    return results


# -- internals ---------------------------------------------------------------------------------


@dataclass
class _Capture:
    """What the hooks of one forward pass keep: anchor rows of each layer, and the head's target rows."""

    index: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    layers: list[torch.Tensor | None]
    head_rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def pick(self, output: Any) -> torch.Tensor:
        """The anchor rows of a layer's output (a tensor, a tuple, or a decoder's ModelOutput)."""
        if not isinstance(output, torch.Tensor):
            last = getattr(output, "last_hidden_state", None)
            output = last if isinstance(last, torch.Tensor) else output[0]
        picked: torch.Tensor = output[self.index, self.positions]
        return picked.float()


def _fingerprint_rows(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, anchors: torch.Tensor
) -> npt.NDArray[np.float32]:
    """[rows, layers] for rows that all have an anchor (see `layer_logit_fingerprints`)."""
    inner, head = _unwrap(model), output_embedding(model)
    device = _input_device(inner)
    input_ids, attention_mask, positions = input_ids.to(device), attention_mask.to(device), anchors.to(device)
    index = torch.arange(len(anchors), device=device)
    capture = _Capture(index, positions, input_ids[index, positions + 1], [None] * _num_layers(model))
    width = int(anchors.max()) + 1  # later tokens cannot change a causal model's state at the anchors
    kwargs = _forward_kwargs(inner, input_ids[:, :width], attention_mask[:, :width])
    layers = _decoder_layers(inner, len(capture.layers))
    with _eval_mode(model), _hooks(inner, head, layers, capture):
        output = _forward(model, **kwargs, output_hidden_states=layers is None)
    if layers is None:  # layers not found: read them from the model's own hidden states (more memory)
        capture.layers = [capture.pick(h) for h in output.hidden_states[1:]]
    weight, bias = capture.head_rows if capture.head_rows is not None else _head_rows(head, capture.targets)
    picked = torch.stack([_required(h) for h in capture.layers])  # [layers, rows, hidden]
    with torch.autocast(device_type=device.type, enabled=False):  # float32 dot products, even under autocast
        logits = torch.einsum("lrh,rh->rl", picked.float(), weight.to(picked.device).float())
        if bias is not None:
            logits = logits + bias.to(picked.device).float().unsqueeze(1)
    result: npt.NDArray[np.float32] = logits.cpu().numpy().astype(np.float32)
    return result


@contextmanager
def _hooks(inner: nn.Module, head: nn.Module, layers: list[nn.Module] | None, capture: _Capture) -> Iterator[None]:
    """Forward hooks that keep only the anchor rows: each decoder layer's output (the last entry from
    the decoder's normed output instead, as `hidden_states[-1]`) and the head's target rows."""
    handles = []

    def keep_layer(i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            capture.layers[i] = capture.pick(output)

        return hook

    def keep_head_rows(module: nn.Module, args: Any) -> None:
        capture.head_rows = _head_rows(module, capture.targets)

    try:
        if layers is not None:
            handles += [layer.register_forward_hook(keep_layer(i)) for i, layer in enumerate(layers[:-1])]
            handles.append(_decoder(inner).register_forward_hook(keep_layer(len(layers) - 1)))
        handles.append(head.register_forward_pre_hook(keep_head_rows))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _head_rows(head: nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding's rows (and bias entries) of `targets`, wherever the weight lives: inside the
    forward pass FSDP has gathered it; a DTensor outside it is gathered whole, once (a fallback)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    assert isinstance(weight, torch.Tensor)  # checked by output_embedding
    weight, bias = _local(weight), _local(bias) if isinstance(bias, torch.Tensor) else None
    index = targets.to(weight.device)
    return weight[index].detach(), None if bias is None else bias[index].detach()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)  # a DTensor (sharded by FSDP2 or tensor parallelism)
    return full_tensor() if callable(full_tensor) else tensor


def _required(tensor: torch.Tensor | None) -> torch.Tensor:
    if tensor is None:
        raise RuntimeError("a decoder layer did not run during the fingerprint pass")
    return tensor


def _decoder_layers(inner: nn.Module, count: int) -> list[nn.Module] | None:
    """The decoder's layer modules: the one ModuleList with `count` entries (None when not exactly one)."""
    lists = [m for m in _decoder(inner).modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    return list(lists[0]) if len(lists) == 1 else None


def _decoder(inner: nn.Module) -> nn.Module:
    """The decoder without its head (e.g. `LlamaModel`); its output's first entry is the normed last state."""
    base = getattr(inner, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not inner else inner


def _forward(model: nn.Module, **kwargs: Any) -> Any:
    """Run the model as it must run: through FSDP1's wrapper (it gathers the shards), but past DDP (no
    collectives needed) and past `torch.compile` (an eager no-grad pass; hooks would force recompiles)."""
    target = _unwrap(model, keep_fsdp=True)
    if getattr(target, "_compiled_call_impl", None) is not None:  # `module.compile()` in place
        return target._call_impl(**kwargs)  # type: ignore[no-untyped-call]
    return target(**kwargs)


def _idle_pass(model: nn.Module) -> None:
    """A one-token forward pass whose result is dropped, so that a sharded model's collectives match up."""
    inner = _unwrap(model)
    ids = torch.zeros((1, 1), dtype=torch.long, device=_input_device(inner))
    with torch.no_grad(), _eval_mode(model):
        _forward(model, **_forward_kwargs(inner, ids, torch.ones_like(ids)))


def _passes_of_slowest_rank(model: nn.Module, passes: int) -> int:
    """The largest number of forward passes any rank of a sharded model needs (this rank's otherwise)."""
    group = _process_group(model)
    if group is None:
        return passes
    import torch.distributed as dist

    nccl_only = "nccl" in str(dist.get_backend(group)) and "gloo" not in str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if nccl_only else torch.device("cpu")
    count = torch.tensor([passes], dtype=torch.long, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())


def _process_group(model: nn.Module) -> Any:
    """The process group whose ranks run this model's forward passes together, when it is sharded
    (FSDP1, or parameters that are DTensors as FSDP2 makes them); None otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    target = _unwrap(model, keep_fsdp=True)
    group = getattr(target, "process_group", None)
    if _is_fsdp1(target) and group is not None:
        return group
    for parameter in target.parameters():
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is not None:
            return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
    return None


def _forward_kwargs(inner: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for a forward pass whose logits are not used, as this model's forward accepts."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "use_cache": False,
        "return_dict": True,
    }
    parameters = inspect.signature(inner.forward).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "position_ids" in parameters or accepts_any:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1  # the logits are not used; skip the full-vocabulary projection
    return kwargs


def _input_device(inner: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device (the local device for sharded weights)."""
    getter = getattr(inner, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(inner.parameters()).device


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


def _is_fsdp1(module: nn.Module) -> bool:
    return any(cls.__name__ == "FullyShardedDataParallel" for cls in type(module).__mro__)


def _unwrap(model: nn.Module, *, keep_fsdp: bool = False) -> nn.Module:
    """The model inside `torch.compile` (`_orig_mod`) and DDP/accelerate wrappers (`.module`); with
    `keep_fsdp`, stop at an FSDP1 wrapper, which must be called for its shards to be gathered."""
    for _ in range(8):  # wrappers nest a few deep at most
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            if keep_fsdp and _is_fsdp1(model):
                return model
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the fingerprint pass, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
