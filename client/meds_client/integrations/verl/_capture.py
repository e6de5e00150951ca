"""Fingerprints taken inside the policy's own forward pass, keeping only the anchor rows.

veRL's actor already runs one forward pass per sample to compute `old_log_probs`. Hooks on the
decoder layers and the final norm copy out the hidden states at the anchors only (a few rows per
micro-batch, not `layers x tokens x hidden`), and the output embedding is read for the target tokens
only: `anchor_logits` gathers those rows, also from a sharded (FSDP2 / DTensor) weight, never the
whole vocabulary matrix. The values match `meds_client.fingerprint.layer_logit_fingerprints`: the
intermediate layers without the final norm, the last one with it (the model's real logit).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils.hooks import RemovableHandle

from ...fingerprint import output_embedding

FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm")


def output_rows(weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`weight[targets]` for an output embedding `[vocab, hidden]`, gathering only those rows.

    A plain tensor is indexed. A DTensor sharded on the vocabulary (`Shard(0)`, as FSDP2 shards it,
    possibly with replicated mesh dims as in HSDP) is read shard by shard: the ranks of the shard
    group agree on the union of the rows they need, each fills in the rows it holds, and one
    all-reduce of `ranks x rows x hidden` values completes them. Every rank of the group must call
    this the same number of times (it does, inside the forward pass they run together). Other
    placements fall back to `full_tensor()`.
    """
    if not isinstance(weight, DTensor):
        return weight[targets]
    local = weight.to_local()
    sharded = [dim for dim, placement in enumerate(weight.placements) if not placement.is_replicate()]
    if not sharded:
        return local[targets]
    if len(sharded) > 1 or weight.placements[sharded[0]] != Shard(0):
        return weight.full_tensor()[targets]
    group = weight.device_mesh.get_group(sharded[0])
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    first, held_rows = int(offset[0]), int(shape[0])
    wanted = _all_requests(targets.to(local.device), group)  # [ranks, width], -1 = padding
    held = (wanted >= first) & (wanted < first + held_rows)
    rows = torch.zeros((*wanted.shape, local.shape[1]), dtype=local.dtype, device=local.device)
    rows[held] = local[wanted[held] - first]
    dist.all_reduce(rows, group=group)
    return rows[dist.get_rank(group), : targets.numel()]


def anchor_logits(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Per row and layer, the logit of `targets[row]` given `hidden[layer, row]`: float32 `[rows, layers]`.

    `head` is the output embedding (`lm_head`); only the target rows of its weight are gathered
    (`output_rows`), and the dot products are taken in float32.
    """
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        rows = output_rows(weight, targets).to(hidden.device, torch.float32)
        logits = torch.einsum("lrh,rh->rl", hidden.float(), rows)
        bias = getattr(head, "bias", None)
        if isinstance(bias, torch.Tensor):
            full_bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
            logits = logits + full_bias[targets.to(full_bias.device)].to(logits.device, torch.float32).unsqueeze(1)
    return logits


class AnchorCapture:
    """Forward hooks on a causal LM that keep the hidden states of chosen rows during one forward pass.

    `arm(rows, targets)` before the forward pass (`rows`: indices into the flattened `[tokens,
    hidden]` activations of the pass; `targets`: the token after each anchor); `take()` after it
    returns `[rows, layers]` float32 fingerprints. The hooks stay installed and cost nothing while
    disarmed. The last layer's values are read after the final norm, so they are the model's logits.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        layers, final_norm = decoder_layers_and_norm(model)
        self.num_layers = len(layers)
        self._rows: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._hidden: list[torch.Tensor] = []
        self._result: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = [layer.register_forward_hook(self._keep) for layer in layers[:-1]]
        self._handles.append(final_norm.register_forward_hook(self._finish))

    def arm(self, rows: torch.Tensor, targets: torch.Tensor) -> None:
        self._rows, self._targets, self._hidden, self._result = rows, targets, [], None

    def take(self) -> torch.Tensor:
        """The fingerprints of the armed rows; disarms. Raises if the forward pass did not reach the final norm."""
        result, self._rows, self._targets, self._hidden, self._result = self._result, None, None, [], None
        if result is None:
            raise RuntimeError("no fingerprints captured: the model's forward pass did not run its final norm")
        return result

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._rows is not None:
            self._hidden.append(_rows_of(output, self._rows))

    def _finish(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._rows is None or self._targets is None:
            return
        self._hidden.append(_rows_of(output, self._rows))
        if len(self._hidden) != self.num_layers:
            raise RuntimeError(f"captured {len(self._hidden)} layers of {self.num_layers}: a layer did not run")
        head = output_embedding(_unwrap(self.model))
        with torch.no_grad():
            self._result = anchor_logits(torch.stack(self._hidden), head, self._targets)
        self._hidden = []


def decoder_layers_and_norm(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The decoder layers and the final norm of a Hugging Face causal LM (inside DDP/FSDP/compile/PEFT wrappers)."""
    inner = _unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(inner, "model", inner)
    layers = getattr(decoder, "layers", None)
    norm = next((getattr(decoder, name) for name in FINAL_NORM_NAMES if hasattr(decoder, name)), None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        raise TypeError(f"cannot find the decoder layers and final norm of {type(inner).__name__}")
    return layers, norm


def _unwrap(model: nn.Module) -> nn.Module:
    for _ in range(8):  # FSDP1/DDP keep `.module`, torch.compile `._orig_mod`, PEFT `get_base_model()`
        get_base = getattr(model, "get_base_model", None)
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if callable(get_base):
            inner = get_base()
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def _rows_of(output: Any, rows: torch.Tensor) -> torch.Tensor:
    hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return hidden.detach().reshape(-1, hidden.shape[-1])[rows.to(hidden.device)]


def _all_requests(targets: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's requested rows, padded with -1 to a common width: `[ranks, width]`."""
    ranks = dist.get_world_size(group)
    count = torch.tensor([targets.numel()], dtype=torch.long, device=targets.device)
    counts = [torch.zeros_like(count) for _ in range(ranks)]
    dist.all_gather(counts, count, group=group)
    width = max(int(c) for c in counts)
    padded = torch.full((width,), -1, dtype=torch.long, device=targets.device)
    padded[: targets.numel()] = targets
    everyone = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(everyone, padded, group=group)
    return torch.stack(everyone)
