"""prompt_id: stable across processes, versions and formatting noise."""

from __future__ import annotations

import pytest

from meds_client import normalize_prompt_text, prompt_id

# Fixed values: changing them breaks every stored memory keyed by these ids.
EXPECTED = {
    "What is 1 + 1?": "72f8917549de2d6d",
    "": "e3b0c44298fc1c14",
    "Café": "73473dcc12b76308",
}


@pytest.mark.parametrize(("text", "expected"), list(EXPECTED.items()))
def test_fixed_values(text: str, expected: str) -> None:
    assert prompt_id(text) == expected


def test_definition_is_sha256_of_normalised_utf8() -> None:
    import hashlib

    text = "  Solve\tfor x:\n\n x + 2 = 5  "
    assert normalize_prompt_text(text) == "Solve for x: x + 2 = 5"
    assert prompt_id(text) == hashlib.sha256(b"Solve for x: x + 2 = 5").hexdigest()[:16]


@pytest.mark.parametrize(
    "variant",
    ["What is 1 + 1?", "  What is 1 + 1?\n", "What\tis 1 +\n1?", "What\u00a0is 1 + 1?", "What is  1 + 1?"],
)
def test_whitespace_variants_share_an_id(variant: str) -> None:
    assert prompt_id(variant) == "72f8917549de2d6d"


def test_unicode_nfc() -> None:
    assert prompt_id("Cafe\u0301") == prompt_id("Caf\u00e9") == "73473dcc12b76308"


@pytest.mark.parametrize("other", ["what is 1 + 1?", "What is 1 + 2?", "What is 1+1?"])
def test_case_and_content_matter(other: str) -> None:
    assert prompt_id(other) != prompt_id("What is 1 + 1?")


def test_shape_and_type_check() -> None:
    value = prompt_id("x")
    assert len(value) == 16 and int(value, 16) >= 0
    with pytest.raises(TypeError):
        prompt_id(b"x")  # type: ignore[arg-type]
