"""Fingerprints (docs/architecture.md, "Fingerprints"): the gathered-row layer logits against a naive
computation (anchors: test_client_anchor.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meds_client import fingerprint
from meds_client.fingerprint import (
    anchor_mask,
    find_boxed_anchor,
    fingerprint_sequences,
    layer_logit_fingerprints,
    output_embedding,
)
from meds_client.testing import NUM_LAYERS, tiny_model, tiny_tokenizer

ARCHITECTURES = ["llama", "qwen2", "gpt_neox"]


TOKENIZER = tiny_tokenizer()


def encode(text: str) -> list[int]:
    return list(TOKENIZER.encode(text, add_special_tokens=False))


def test_anchor_mask() -> None:
    assert anchor_mask([3, None, -1, 0]).tolist() == [True, False, False, True]


# -- layer logits ------------------------------------------------------------------------------


def naive_fingerprint(model: torch.nn.Module, ids: list[int], anchor: int) -> np.ndarray:
    """The reference computation: full-vocabulary logits of every layer at the anchor, one picked."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        head = output_embedding(model)
        return np.array([head(h[0, anchor])[ids[anchor + 1]].item() for h in out.hidden_states[1:]], dtype=np.float32)


RESPONSES = ["x=\\boxed{5}.", "so \\boxed{42} done", "no box here at all", "first 3, then y=\\boxed{7}"]
PROMPT = "Question: what is 2 + 3? Answer:"


def padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor, list[int | None], list[list[int]]]:
    """Prompt+response rows padded on `side`, their anchors as indices into the padded rows."""
    rows = [encode(PROMPT) + encode(r) for r in RESPONSES]
    starts = [len(encode(PROMPT))] * len(rows)
    width = max(map(len, rows)) + 2
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    anchors: list[int | None] = []
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        offset = width - len(row) if side == "left" else 0
        ids[i, offset : offset + len(row)] = torch.tensor(row)
        mask[i, offset : offset + len(row)] = 1
        anchor = find_boxed_anchor(row[start:], TOKENIZER)
        anchors.append(None if anchor is None else offset + start + anchor)
    return ids, mask, anchors, rows


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_matches_naive_full_vocabulary_computation(kind: str) -> None:
    model = tiny_model(kind)
    ids, mask, anchors, rows = padded_batch("right")
    fingerprints = layer_logit_fingerprints(model, ids, mask, anchors)
    assert fingerprints.shape == (len(rows), NUM_LAYERS) and fingerprints.dtype == np.float32
    for row, anchor, vector in zip(rows, anchors, fingerprints, strict=True):
        if anchor is None:
            assert not vector.any()
        else:
            np.testing.assert_allclose(vector, naive_fingerprint(model, row, anchor), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_left_and_right_padding_agree(kind: str) -> None:
    model = tiny_model(kind)
    right = layer_logit_fingerprints(model, *padded_batch("right")[:3])
    left = layer_logit_fingerprints(model, *padded_batch("left")[:3])
    assert np.abs(right).sum() > 0
    np.testing.assert_allclose(left, right, atol=1e-5, rtol=0)


def test_bias_of_the_output_embedding_is_added() -> None:
    model = tiny_model("llama")
    ids, mask, anchors, rows = padded_batch("right")
    head = output_embedding(model)
    assert isinstance(head, torch.nn.Linear)
    head.bias = torch.nn.Parameter(torch.randn(head.out_features))
    fingerprints = layer_logit_fingerprints(model, ids, mask, anchors)
    np.testing.assert_allclose(fingerprints[0], naive_fingerprint(model, rows[0], anchors[0] or 0), atol=1e-5)


def test_last_n_layers_keeps_the_deepest_layers() -> None:
    model = tiny_model("qwen2")
    ids, mask, anchors, _ = padded_batch("right")
    full = layer_logit_fingerprints(model, ids, mask, anchors)
    np.testing.assert_array_equal(layer_logit_fingerprints(model, ids, mask, anchors, last_n_layers=2), full[:, -2:])


def test_never_projects_more_than_one_position_per_row_onto_the_vocabulary() -> None:
    model = tiny_model("llama")
    ids, mask, anchors, _ = padded_batch("right")
    projected: list[int] = []
    hook = output_embedding(model).register_forward_hook(lambda m, i, o: projected.append(o.shape[:-1].numel()))
    try:
        layer_logit_fingerprints(model, ids, mask, anchors)
    finally:
        hook.remove()
    assert sum(projected) <= sum(a is not None for a in anchors)


def test_restores_training_mode_and_takes_no_gradients() -> None:
    model = tiny_model("gpt_neox").train()
    ids, mask, anchors, _ = padded_batch("right")
    layer_logit_fingerprints(model, ids, mask, anchors)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_rows_without_anchor_are_not_run_and_all_none_gives_zeros() -> None:
    model = tiny_model("llama")
    ids, mask, _, _ = padded_batch("right")
    assert not layer_logit_fingerprints(model, ids, mask, [None] * len(ids)).any()


@pytest.mark.parametrize("bad", ["pad", "last"])
def test_rejects_anchor_without_a_real_next_token(bad: str) -> None:
    model = tiny_model("llama")
    ids, mask, anchors, rows = padded_batch("right")
    anchors[0] = len(rows[0]) - 1 if bad == "pad" else ids.shape[1] - 1
    with pytest.raises(ValueError, match="anchor"):
        layer_logit_fingerprints(model, ids, mask, anchors)


def test_rejects_mismatched_anchor_count() -> None:
    ids, mask, anchors, _ = padded_batch("right")
    with pytest.raises(ValueError, match="anchor positions"):
        layer_logit_fingerprints(tiny_model("llama"), ids, mask, anchors[:-1])


def test_fingerprint_sequences_matches_per_row_results() -> None:
    model = tiny_model("qwen2")
    prompt = encode(PROMPT)
    rows = [prompt + encode(r) for r in RESPONSES]
    starts = [len(prompt)] * len(rows)
    batched = fingerprint_sequences(model, TOKENIZER, rows, starts, batch_size=2)
    assert [v is None for v in batched] == [False, False, True, False]
    for row, vector in zip(rows, batched, strict=True):
        if vector is not None:
            anchor = len(prompt) + (find_boxed_anchor(row[len(prompt) :], TOKENIZER) or 0)
            np.testing.assert_allclose(vector, naive_fingerprint(model, row, anchor), atol=1e-5)


def test_fingerprint_sequences_searches_the_response_only() -> None:
    prompt = encode("Put the answer in x=\\boxed{1} style.")
    rows = [prompt + encode(" it is four")]
    assert fingerprint_sequences(tiny_model("llama"), TOKENIZER, rows, [len(prompt)]) == [None]


def test_a_prefilled_answer_is_fingerprinted_at_the_last_prompt_token() -> None:
    model = tiny_model("llama")
    prompt = encode(PROMPT + " \\boxed{")
    row = prompt + encode("5}.")
    [vector] = fingerprint_sequences(model, TOKENIZER, [row], [len(prompt)])
    assert vector is not None
    np.testing.assert_allclose(vector, naive_fingerprint(model, row, len(prompt) - 1), atol=1e-5, rtol=0)


def test_hidden_states_of_all_layers_are_not_kept() -> None:
    model = tiny_model("qwen2")
    ids, mask, anchors, rows = padded_batch("right")
    seen: list[object] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("output_hidden_states")), with_kwargs=True
    )
    try:
        fingerprints = layer_logit_fingerprints(model, ids, mask, anchors)
    finally:
        hook.remove()
    assert seen == [False]
    np.testing.assert_allclose(fingerprints[0], naive_fingerprint(model, rows[0], anchors[0] or 0), atol=1e-5, rtol=0)


def test_models_whose_layers_cannot_be_found_use_their_hidden_states(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("gpt_neox")
    ids, mask, anchors, _ = padded_batch("right")
    hooked = layer_logit_fingerprints(model, ids, mask, anchors)
    monkeypatch.setattr(fingerprint, "_decoder_layers", lambda inner, count: None)
    np.testing.assert_array_equal(layer_logit_fingerprints(model, ids, mask, anchors), hooked)


def test_output_embedding_of_gpt_neox_is_embed_out() -> None:
    model = tiny_model("gpt_neox")
    assert output_embedding(model) is model.embed_out
    with pytest.raises(TypeError):
        output_embedding(torch.nn.Linear(2, 2))
