"""A stable prompt id derived from the question text.

Trainers rarely carry a stable per-prompt key (veRL's `uid` changes every step, OpenRLHF and TRL send
none), yet MEDS memory is keyed per prompt across epochs. `prompt_id` gives every trainer, process
and machine the same id for the same question.
"""

from __future__ import annotations

import hashlib
import unicodedata

PROMPT_ID_LENGTH = 16


def normalize_prompt_text(text: str) -> str:
    """The text that `prompt_id` hashes: Unicode NFC, every whitespace run made one space, stripped.

    Case and punctuation are kept: in maths, `x` and `X` are different questions.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def prompt_id(prompt_text: str) -> str:
    """The id of a prompt: the first 16 hex digits of SHA-256 over the UTF-8 of the normalised text.

    Normalisation is `normalize_prompt_text` (NFC, whitespace runs → one ASCII space, strip), so
    re-wrapped or re-indented copies of a question share an id. Pass the *question* (what is stable
    across epochs), not a chat-templated string that embeds per-step content. 64 bits keep collisions
    negligible for any dataset size a run can have (≈ n²/2⁶⁵).

    >>> prompt_id("What is 1 + 1?")
    '72f8917549de2d6d'
    """
    if not isinstance(prompt_text, str):
        raise TypeError(f"prompt_text must be str, got {type(prompt_text).__name__}")
    digest = hashlib.sha256(normalize_prompt_text(prompt_text).encode("utf-8")).hexdigest()
    return digest[:PROMPT_ID_LENGTH]
