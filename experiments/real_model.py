"""The same comparison on a real pretrained causal LM (a local path or a Hugging Face model id).

    python -m experiments.real_model --model Qwen/Qwen2.5-0.5B-Instruct --out experiments/results/real

No warm-up: a pretrained model brings its own recurring errors. The task is multi-digit multiplication
(`Compute 347*28.` answered in `\\boxed{}`), hard enough that small models repeat mistakes on the same
prompts. Both arms (observe-only GRPO and GRPO + MEDS) run through `MedsGRPOTrainer` against a live
`meds serve`, with the same seeds and budget; it runs on the GPU when there is one. Each arm reloads the
model from `--model`, so memory holds one policy at a time. Not run in CI (it needs weights).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .run import Experiment, TaskData, _quiet, run_experiment
from .task import Problem

INSTRUCTION = "Compute {a}*{b}. Think step by step, then put the final answer in \\boxed{{}}."

__all__ = ["load_task", "main"]


def multiplication_problems(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Distinct 3-digit by 2-digit products: (training prompts, held-out prompts)."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(100, 1000) for b in range(11, 100)], n_train + n_eval)
    problems = [Problem(a, "*", b) for a, b in pairs]
    return problems[:n_train], problems[n_train:]


def load_task(model: str, experiment: Experiment) -> TaskData:
    """Tokenizer, prompts (chat-formatted when the tokenizer has a template) and a policy loader."""
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, held_out = multiplication_problems(experiment.train_prompts, experiment.eval_prompts)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32

    def format_prompt(problem: Problem) -> str:
        text = INSTRUCTION.format(a=problem.a, b=problem.b)
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return text + "\n"

    def new_policy() -> PreTrainedModel:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        policy: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device)
        return policy

    with torch.device("meta"):  # count parameters without loading weights
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))  # type: ignore[no-untyped-call]
    parameters = sum(p.numel() for p in skeleton.parameters())
    return TaskData(tokenizer, train, held_out, new_policy, parameters, format_prompt=format_prompt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local path or Hugging Face model id of a causal LM")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/real"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--generations", type=int, default=8, help="rollouts per prompt (the k of pass@k)")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--max-completion-tokens", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--last-n-layers", type=int, default=14, help="fingerprint the deepest n layers")
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop each arm after this many steps")
    args = parser.parse_args(argv)
    _quiet()
    experiment = replace(
        Experiment(),
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        train_prompts=args.train_prompts,
        eval_prompts=args.eval_prompts,
        generations=args.generations,
        prompts_per_step=args.prompts_per_step,
        max_completion_tokens=args.max_completion_tokens,
        learning_rate=args.learning_rate,
        last_n_layers=args.last_n_layers,
        eval_batch_size=args.eval_batch_size,
        max_steps=args.max_steps,
        grid=(),
        plain_seed=None,
        threads=max(torch.get_num_threads(), 1),
    )
    frame = run_experiment(experiment, args.out, data=load_task(args.model, experiment))
    from .plot import plot_all

    plot_all(frame, args.out, experiment.steps_per_epoch)
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
