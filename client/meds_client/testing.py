"""Tiny randomly initialised causal LMs and a BPE tokenizer trained in-process, for tests.

They let a trainer integration be exercised end to end on a CPU with no downloads: the same code path
as a real model, in milliseconds. Needs the `fingerprint` extra (transformers brings `tokenizers`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = [
    "Question: what is 2 + 3? Answer: the sum is \\boxed{5}.",
    "Compute 7 * 6. We multiply and get \\boxed{42}.",
    "Solve x + 1 = 4. Subtract one: x = 3, so \\boxed{3}.",
    "The area of a 2 by 9 rectangle is \\boxed{18}.",
    "Think step by step. First add, then divide. Final answer: \\boxed{12}.",
    "What is the remainder of 17 divided by 5? It is \\boxed{2}.",
    "Let us count the apples and pears: 3 + 4 = 7, answer \\boxed{7}.",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
HIDDEN_SIZE = 32
NUM_LAYERS = 3

__all__ = ["CORPUS", "NUM_LAYERS", "TOKENIZER_KINDS", "tiny_model", "tiny_tokenizer"]


TOKENIZER_KINDS = ("byte_level", "metaspace", "wordpiece", "char")
"""Byte-level BPE (GPT-2, Llama 3, Qwen), SentencePiece-style `▁` BPE (Llama 2, Mistral), WordPiece (BERT)
and one token per character: the ways tokenizers split `\\boxed{` differently."""


def tiny_tokenizer(kind: str = "byte_level") -> PreTrainedTokenizerFast:
    """A small tokenizer (~300 tokens) trained in-process on a few maths sentences; a new object per call.

    `kind` is one of `TOKENIZER_KINDS`; the default is byte-level BPE.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(kind)),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )


@functools.cache
def _trained_tokenizer_json(kind: str) -> str:
    tokenizer: Tokenizer
    if kind == "char":
        alphabet = sorted({c for line in CORPUS for c in line} | set("\\{}fbox"))
        vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "<unk>", *alphabet])}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # type: ignore[assignment]
        tokenizer.decoder = decoders.Fuse()  # type: ignore[assignment]
        return str(tokenizer.to_str())
    special = [*SPECIAL_TOKENS, "<unk>"]
    trainer: Any
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # type: ignore[assignment]
        tokenizer.decoder = decoders.WordPiece()  # type: ignore[assignment]
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=special)
    elif kind == "metaspace":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()  # type: ignore[assignment]
        tokenizer.decoder = decoders.Metaspace()  # type: ignore[assignment]
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special)
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
        tokenizer.decoder = decoders.ByteLevel()  # type: ignore[assignment]
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return str(tokenizer.to_str())


def tiny_model(kind: str, *, vocab_size: int | None = None, seed: int = 0) -> PreTrainedModel:
    """A tiny fp32 causal LM of the given architecture: "llama", "qwen2" or "gpt_neox"."""
    if kind not in _CONFIGS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_CONFIGS)}")
    config_class, extra = _CONFIGS[kind]
    config = config_class(
        vocab_size=vocab_size or len(tiny_tokenizer()),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    return model


_CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (LlamaConfig, {"num_key_value_heads": 2}),
    "qwen2": (Qwen2Config, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "gpt_neox": (GPTNeoXConfig, {"use_parallel_residual": True}),  # output embedding is `embed_out`
}
