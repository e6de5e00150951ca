"""The synthetic task: two-digit addition and subtraction with `\\boxed{}` answers and planted error modes.

A prompt is `47+38=`; the correct completion is `\\boxed{85}`. The supervised warm-up data plants three
systematic error modes, each tied to a kind of problem the model can recognise, so the starting policy
repeats the same wrong answer on the same prompts (and on unseen prompts of the same kind):

- dropped carry: additions whose units carry, answered without the carry (47+38 -> 75);
- swapped operand: subtractions, answered as b-a (52-17 -> -35);
- off-by-one: additions without a carry, answered one too high (23+41 -> 65).

The model is a small Llama built from a config and the tokenizer is character-level, built in code: no
downloads.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARACTERS = list("0123456789+-=\\boxed{}")
ERROR_MODES = ("dropped_carry", "swapped_operand", "off_by_one")

__all__ = [
    "ERROR_MODES",
    "ModelSize",
    "Problem",
    "boxed_answer",
    "build_model",
    "build_tokenizer",
    "planted_answer",
    "split_problems",
    "warm_up",
]


@dataclass(frozen=True)
class Problem:
    """One arithmetic question: `a op b`, with `op` "+", "-" (a > b) or "*" (the real-model task)."""

    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def error_mode(self) -> str:
        if self.op == "*":
            return "none"  # the real-model task plants nothing
        if self.op == "-":
            return "swapped_operand"
        return "dropped_carry" if self.a % 10 + self.b % 10 >= 10 else "off_by_one"

    @property
    def planted_answer(self) -> int:
        return planted_answer(self)


def planted_answer(problem: Problem) -> int:
    """The wrong answer the warm-up data teaches for this problem's error mode."""
    mode = problem.error_mode
    if mode == "none":
        return problem.answer
    if mode == "swapped_operand":
        return problem.b - problem.a
    if mode == "dropped_carry":
        return problem.answer - 10
    return problem.answer + 1


def completion(answer: int) -> str:
    return f"\\boxed{{{answer}}}"


def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = text.find("}", start)
    return text[start + len("\\boxed{") : end if end >= 0 else len(text)].strip() or None


def all_problems() -> list[Problem]:
    plus = [Problem(a, "+", b) for a in range(10, 100) for b in range(1, 10)]
    minus = [Problem(a, "-", b) for a in range(10, 100) for b in range(1, 10)]
    return plus + minus


def split_problems(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(RL training prompts, held-out evaluation prompts, warm-up problems). The evaluation prompts
    appear in neither the warm-up nor RL training; the RL prompts are part of the warm-up. Each split
    holds the three error modes in equal shares."""
    rng = random.Random(seed)
    by_mode: dict[str, list[Problem]] = {mode: [] for mode in ERROR_MODES}
    for problem in all_problems():
        by_mode[problem.error_mode].append(problem)
    train: list[Problem] = []
    held_out: list[Problem] = []
    rest: list[Problem] = []
    for i, mode in enumerate(ERROR_MODES):
        pool = by_mode[mode]
        rng.shuffle(pool)
        t = n_train // 3 + (1 if i < n_train % 3 else 0)
        e = n_eval // 3 + (1 if i < n_eval % 3 else 0)
        train += pool[:t]
        held_out += pool[t : t + e]
        rest += pool[t + e :]
    return train, held_out, train + rest


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the task's alphabet (one token per character), built in code."""
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # type: ignore[assignment]
    backend.decoder = decoders.Fuse()  # type: ignore[assignment]
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384


def build_model(tokenizer: PreTrainedTokenizerFast, size: ModelSize = ModelSize(), seed: int = 0) -> LlamaForCausalLM:
    """A small Llama (about 0.8 M parameters at the default size) built from a config."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)  # type: ignore[no-untyped-call]


def warm_up_examples(problems: list[Problem], error_rate: float, rng: random.Random) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, completion): the planted wrong answer with probability `error_rate`."""
    while True:
        problem = rng.choice(problems)
        answer = problem.planted_answer if rng.random() < error_rate else problem.answer
        yield problem.prompt, completion(answer)


def warm_up(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    *,
    steps: int,
    error_rate: float,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Supervised warm-up on completions only (loss on the completion and its end token); returns losses."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    stream = warm_up_examples(problems, error_rate, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    losses: list[float] = []
    eos = tokenizer.eos_token_id
    for _ in tqdm(range(steps), desc="warm-up", disable=not progress, leave=False):
        rows, labels = [], []
        for prompt, answer in (next(stream) for _ in range(batch_size)):
            p = tokenizer.encode(prompt, add_special_tokens=False)
            c = [*tokenizer.encode(answer, add_special_tokens=False), eos]
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        # right padding: every prompt has the same length, so positions match generation's
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        target = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()  # type: ignore[no-untyped-call]
    return losses
