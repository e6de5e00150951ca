"""Fingerprint anchors from the decoded text, on every kind of tokenizer (built offline in code)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from meds_client.fingerprint import find_boxed_anchor, response_anchor, response_anchors
from meds_client.testing import TOKENIZER_KINDS, tiny_tokenizer

TOKENIZERS = {kind: tiny_tokenizer(kind) for kind in TOKENIZER_KINDS}
PROMPT = "Question: what is 2 + 3? Answer:"


@pytest.fixture(params=TOKENIZER_KINDS)
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return TOKENIZERS[request.param]


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def anchored(tokenizer: Any, response: str, prompt: str = PROMPT) -> tuple[list[int], int | None, int]:
    prompt_ids = encode(tokenizer, prompt)
    ids = prompt_ids + encode(tokenizer, response)
    return ids, response_anchor(tokenizer, ids, len(prompt_ids)), len(prompt_ids)


def after(tokenizer: Any, ids: list[int], anchor: int | None) -> str:
    """The text sampled after the anchor (what the fingerprint's target token starts)."""
    assert anchor is not None
    return str(tokenizer.decode(ids[anchor + 1 :])).lstrip()


def test_byte_level_bpe_anchors_on_the_last_box_not_the_first() -> None:
    # Measured: the token-sequence search found `\`, `boxed`, `{` only in the first box, because the
    # second one is tokenised `Ġ\`, `boxed`, `{`, and it anchored there.
    tokenizer = TOKENIZERS["byte_level"]
    ids, anchor, _ = anchored(tokenizer, "x=\\boxed{3}, so the answer is \\boxed{7}")
    assert after(tokenizer, ids, anchor).startswith("7")


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("x=\\boxed{3}, so the answer is \\boxed{7}", "7"),  # a space before the second `\boxed`
        ("x=\\boxed{3}, so the answer is:\\boxed{7}", "7"),  # no space
        (" \\boxed{3} or \\boxed{7} done.", "7"),
        ("\\boxed{\\frac{1}{2}} is it", "\\"),  # nested braces: the `{` right after `boxed`
        ("so \\boxed{\\boxed{3}} twice", "3"),  # nested boxes: the last `\boxed{` in the text
        ("so \\boxed {5} with a space", "5"),  # accepted, like the reference's fallback
        ("\\boxed{5}, not \\fbox{6}", "5"),  # `\fbox{` is not an anchor
    ],
)
def test_anchor_is_the_brace_of_the_last_boxed_on_every_tokenizer(tokenizer: Any, response: str, answer: str) -> None:
    ids, anchor, start = anchored(tokenizer, response)
    assert anchor is not None and anchor >= start
    assert "{" in tokenizer.decode([ids[anchor]])
    assert after(tokenizer, ids, anchor).startswith(answer)


@pytest.mark.parametrize("response", ["no box here at all", "only \\fbox{6}", "a \\Boxed{6} is not LaTeX"])
def test_no_anchor_without_a_boxed(tokenizer: Any, response: str) -> None:
    assert anchored(tokenizer, response)[1] is None


def test_no_anchor_when_nothing_is_sampled_after_the_brace(tokenizer: Any) -> None:
    assert anchored(tokenizer, "the answer is \\boxed{")[1] is None


def test_a_prompt_that_ends_in_boxed_anchors_on_its_last_token(tokenizer: Any) -> None:
    # Measured: an answer prefill (`... \boxed{` at the end of the prompt) gave ~0 % fingerprints.
    ids, anchor, start = anchored(tokenizer, "42}.", prompt=PROMPT + " \\boxed{")
    assert anchor == start - 1
    assert after(tokenizer, ids, anchor).startswith("42")


def test_a_box_in_the_response_wins_over_the_prefill(tokenizer: Any) -> None:
    ids, anchor, start = anchored(tokenizer, "4}, or rather \\boxed{5}", prompt=PROMPT + " \\boxed{")
    assert anchor is not None and anchor > start
    assert after(tokenizer, ids, anchor).startswith("5")


def test_a_box_inside_the_prompt_is_not_an_anchor(tokenizer: Any) -> None:
    assert anchored(tokenizer, " it is four", prompt="Write it as x=\\boxed{1} please.")[1] is None


def test_prefill_with_an_empty_response_has_no_anchor(tokenizer: Any) -> None:
    ids = encode(tokenizer, PROMPT + " \\boxed{")
    assert response_anchor(tokenizer, ids, len(ids)) is None


def test_find_boxed_anchor_indexes_the_response(tokenizer: Any) -> None:
    response = encode(tokenizer, "so x=\\boxed{3} and then \\boxed{7}")
    anchor = find_boxed_anchor(response, tokenizer, pattern=[1, 2])
    assert anchor == response_anchor(tokenizer, response, 0)
    assert after(tokenizer, response, anchor).startswith("7")


def test_long_responses_decode_a_window_not_every_prefix() -> None:
    tokenizer = CountingTokenizer(TOKENIZERS["byte_level"])
    filler = " then add 3 + 4" * 200
    for response, answer in [(filler + " \\boxed{7}", "7"), ("\\boxed{5}" + filler, "5")]:
        ids = encode(tokenizer.inner, response)
        tokenizer.decoded = 0
        anchor = response_anchor(tokenizer, ids, 0)
        assert after(tokenizer.inner, ids, anchor).startswith(answer)
        assert tokenizer.decoded < 12 * len(ids)  # prefix-by-prefix decoding would be ~len(ids) ** 2 / 2


def test_rejects_a_response_start_outside_the_sequence() -> None:
    with pytest.raises(ValueError, match="response_start"):
        response_anchor(TOKENIZERS["char"], [1, 2, 3], 4)


def test_batch_warns_once_with_the_reason_when_most_rows_have_no_anchor(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = TOKENIZERS["byte_level"]
    prompt = encode(tokenizer, PROMPT)
    rows = [prompt + encode(tokenizer, r) for r in ["no box", "still none", "\\boxed{5}.", "cut at \\boxed{"]]
    with caplog.at_level(logging.WARNING, logger="meds_client"):
        anchors = response_anchors(tokenizer, rows, [len(prompt)] * len(rows))
    assert [a is None for a in anchors] == [True, True, False, True]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "3 of 4 responses" in message and "2 contain no `\\boxed{`" in message and "1 end right at" in message


def test_batch_with_mostly_anchors_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = TOKENIZERS["byte_level"]
    rows = [encode(tokenizer, r) for r in ["\\boxed{1}.", "\\boxed{2}.", "none"]]
    with caplog.at_level(logging.WARNING, logger="meds_client"):
        response_anchors(tokenizer, rows, [0, 0, 0])
    assert not caplog.records


class CountingTokenizer:
    """Counts the tokens decoded, to bound the cost of the search."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded += len(ids)
        return str(self.inner.decode(ids, **kwargs))
