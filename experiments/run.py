"""GRPO with and without MEDS on the planted-error arithmetic task, through TRL and a live service.

    python -m experiments.run              # the full comparison and the grid (see experiments/README.md)
    python -m experiments.run --smoke      # two steps per arm, one seed: checks that everything runs

Arms, all with the same seeds, prompts, warm-up policy, budget and hyper-parameters:

- `grpo`: `MedsGRPOTrainer` + `MedsPenaltyReward` on a run with `penalty_target=none` (observe-only:
  the service fingerprints and clusters the errors, and shapes nothing), i.e. plain GRPO whose collapse
  metrics come from the same service;
- `meds`: the same with `penalty_target=wrong` (MEDS);
- `plain`: TRL's own `GRPOTrainer` with no MEDS at all, one seed: the wall time per step without MEDS.

Every step logs held-out pass@1 / pass@k, distinct wrong answers and the repeat rate of the most common
wrong answer, the error clusters per prompt the service reports, the share of rollouts fingerprinted and
the wall time of the step, to `steps.csv`; `plot.py` draws `comparison.png` and `grid.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl.trainer.grpo_config import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer

from meds_client import MedsClient, NotFoundError, prompt_id
from meds_client.integrations.trl import FINGERPRINT_COLUMN, MedsGRPOTrainer, MedsPenaltyReward

from .metrics import answer_stats
from .task import Problem, boxed_answer, build_model, build_tokenizer, split_problems, warm_up

RESULTS = Path(__file__).parent / "results"
STEP_COLUMNS = [
    "group", "arm", "seed", "alpha", "beta", "step", "epoch",
    "pass_at_1", "pass_at_k", "distinct_wrong", "top_wrong_repeat", "planted",
    "train_pass_at_1", "train_distinct_wrong", "train_top_wrong_repeat",
    "clusters_per_prompt", "largest_cluster_share", "memory_vectors",
    "fingerprinted_frac", "penalty_mean", "penalized_frac", "step_seconds",
]  # fmt: skip

__all__ = ["STEP_COLUMNS", "Arm", "Experiment", "main", "run_experiment"]


@dataclass(frozen=True)
class Experiment:
    """Everything both arms share. The defaults are the full run."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 10
    train_prompts: int = 48
    eval_prompts: int = 96
    generations: int = 8
    """Rollouts per prompt (the k of pass@k)."""
    prompts_per_step: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 1000
    error_rate: float = 0.6
    """Share of warm-up answers that are the planted wrong answer."""
    alpha: float = 0.1
    beta: float = 0.2
    grid: tuple[tuple[float, float], ...] = ((0.1, 1.0), (0.5, 0.2), (0.5, 1.0))
    """Extra (alpha, beta) cells for the MEDS arm; epochs are read along each run (constant learning rate)."""
    grid_seeds: tuple[int, ...] = (0, 1, 2)
    plain_seed: int | None = 0
    max_steps: int = -1
    """Stop each run after this many steps (-1: run every epoch)."""
    threads: int = 1
    max_completion_tokens: int = 12
    """`\\boxed{-89}` and the end token for the tiny task; real models need room to reason."""
    last_n_layers: int | None = None
    """Fingerprint only the deepest layers (the paper uses 14 on 28-layer models)."""
    eval_batch_size: int = 4096
    scale_rewards: str = "group"
    """GRPO's reward scaling (TRL): "group" divides by each group's standard deviation, "none" does not."""
    """Sequences generated at once during evaluation."""

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_prompts / self.prompts_per_step)

    @property
    def steps_per_run(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return total if self.max_steps < 0 else min(total, self.max_steps)


SMOKE = Experiment(
    seeds=(0,), epochs=1, train_prompts=4, eval_prompts=3, generations=4, prompts_per_step=2,
    warmup_steps=40, grid=(), grid_seeds=(), plain_seed=None, max_steps=2,
)  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One training run: `penalty_target` None means TRL's `GRPOTrainer` without MEDS."""

    group: str
    name: str
    seed: int
    penalty_target: str | None
    alpha: float
    beta: float

    @property
    def run_id(self) -> str:
        return f"exp-{self.group}-{self.name}-a{self.alpha}-b{self.beta}-s{self.seed}"


def arms(experiment: Experiment) -> list[Arm]:
    """The main comparison first (both arms, every seed), then the plain timing run, then the grid."""
    e = experiment
    out = [Arm("main", name, seed, target, e.alpha, e.beta) for seed in e.seeds
           for name, target in (("grpo", "none"), ("meds", "wrong"))]  # fmt: skip
    if e.plain_seed is not None:
        out.append(Arm("main", "plain", e.plain_seed, None, e.alpha, e.beta))
    out += [Arm("grid", "meds", seed, "wrong", a, b) for a, b in e.grid for seed in e.grid_seeds]
    return out


@dataclass
class TaskData:
    """The prompts, the tokenizer, and a factory of fresh copies of the starting policy."""

    tokenizer: PreTrainedTokenizerBase
    train: list[Problem]
    held_out: list[Problem]
    new_policy: Callable[[], PreTrainedModel]
    parameters: int
    format_prompt: Callable[[Problem], str] = lambda problem: problem.prompt
    warm_up_loss: list[float] = field(default_factory=list)


def prepare(experiment: Experiment, progress: bool, cache: Path | None = None) -> TaskData:
    """The prompts and the starting policy (supervised warm-up with planted errors), shared by every arm.

    With `cache`, the warmed-up weights are kept in that folder, keyed by the settings that shape them.
    """
    e = experiment
    tokenizer = build_tokenizer()
    train, held_out, warm = split_problems(e.train_prompts, e.eval_prompts)
    policy = build_model(tokenizer)
    key = f"warm-up-{e.warmup_steps}-{e.error_rate}-{e.train_prompts}-{e.eval_prompts}-{policy.num_parameters()}.pt"
    losses: list[float] = []
    if cache is not None and (cache / key).exists():
        policy.load_state_dict(torch.load(cache / key))
    else:
        losses = warm_up(policy, tokenizer, warm, steps=e.warmup_steps, error_rate=e.error_rate, progress=progress)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(policy.state_dict(), cache / key)
    return TaskData(
        tokenizer,
        train,
        held_out,
        lambda: copy.deepcopy(policy),
        policy.num_parameters(),
        warm_up_loss=losses,
    )


def planted_text(problem: Problem) -> str:
    """The planted wrong answer as text; "" (matches no answer) for a task without planted errors."""
    return "" if problem.error_mode == "none" else str(problem.planted_answer)


def accuracy(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 when the last `\\boxed{}` holds the right answer."""
    return [float(boxed_answer(c) == a) for c, a in zip(completions, answer, strict=True)]


class BatchObserver:
    """A reward function of weight 0 that keeps what the trainer generated in the last step."""

    __name__ = "observe"

    def __init__(self) -> None:
        self.answers: list[str | None] = []
        self.expected: list[str] = []
        self.planted: list[str] = []
        self.fingerprinted: list[bool] = []

    def __call__(
        self, completions: Sequence[str], answer: Sequence[str], planted: Sequence[str], **kw: Any
    ) -> list[float | None]:
        self.answers = [boxed_answer(c) for c in completions]
        self.expected, self.planted = list(answer), list(planted)
        fingerprints = kw.get(FINGERPRINT_COLUMN, [None] * len(completions))
        self.fingerprinted = [f is not None for f in fingerprints]
        return [0.0] * len(completions)

    def stats(self, generations: int) -> dict[str, float]:
        """Training-batch statistics, rollouts grouped by prompt (TRL keeps a group's rollouts together)."""
        groups = range(0, len(self.answers), generations)
        s = answer_stats(
            [self.answers[i : i + generations] for i in groups],
            [self.expected[i] for i in groups],
            [self.planted[i] for i in groups],
        )
        return {
            "train_pass_at_1": s.pass_at_1,
            "train_distinct_wrong": s.distinct_wrong,
            "train_top_wrong_repeat": s.top_wrong_repeat,
            "fingerprinted_frac": float(np.mean(self.fingerprinted)) if self.fingerprinted else float("nan"),
        }


class Evaluator:
    """k samples per held-out prompt, drawn with their own seed so that evaluation leaves training's RNG alone."""

    def __init__(self, data: TaskData, experiment: Experiment) -> None:
        self.tokenizer, self.problems, self.k = data.tokenizer, data.held_out, experiment.generations
        self.max_new_tokens, self.batch_size = experiment.max_completion_tokens, experiment.eval_batch_size
        prompts = [data.format_prompt(p) for p in self.problems]
        encoded = self.tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True)
        self.input_ids = encoded["input_ids"].repeat_interleave(self.k, dim=0)
        self.attention_mask = encoded["attention_mask"].repeat_interleave(self.k, dim=0)

    def __call__(self, model: Any, seed: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        texts: list[str] = []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for lo in range(0, len(self.input_ids), self.batch_size):
                out = model.generate(
                    input_ids=self.input_ids[lo : lo + self.batch_size].to(model.device),
                    attention_mask=self.attention_mask[lo : lo + self.batch_size].to(model.device),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
                texts += self.tokenizer.batch_decode(out[:, self.input_ids.shape[1] :], skip_special_tokens=True)
        model.train(was_training)
        answers = [boxed_answer(t) for t in texts]
        s = answer_stats(
            [answers[i * self.k : (i + 1) * self.k] for i in range(len(self.problems))],
            [str(p.answer) for p in self.problems],
            [planted_text(p) for p in self.problems],
        )
        return {
            "pass_at_1": s.pass_at_1,
            "pass_at_k": s.pass_at_k,
            "distinct_wrong": s.distinct_wrong,
            "top_wrong_repeat": s.top_wrong_repeat,
            "planted": s.planted,
        }


def memory_stats(client: MedsClient, run: str, prompt_ids: Sequence[str]) -> dict[str, float]:
    """Error clusters per prompt as the service reports them, after refitting every key of the run.

    Noise (-1) counts as one cluster, as the service's penalty does. Averages over prompts with stored
    wrong rollouts.
    """
    client.recluster(run, all=True)
    clusters, largest, vectors = [], [], 0
    for pid in prompt_ids:
        try:
            wrong = client.get_prompt(run, pid).groups.get("wrong")
        except NotFoundError:
            continue
        if wrong is None or wrong.vectors == 0:
            continue
        vectors += wrong.vectors
        sizes = [size for size in wrong.clusters.values() if size > 0]
        if sizes:
            clusters.append(len(sizes))
            largest.append(max(sizes) / sum(sizes))
    return {
        "clusters_per_prompt": float(np.mean(clusters)) if clusters else float("nan"),
        "largest_cluster_share": float(np.mean(largest)) if largest else float("nan"),
        "memory_vectors": float(vectors),
    }


class StepRecorder(TrainerCallback):  # type: ignore[misc]
    """After each optimisation step: time it, evaluate, ask the service; one row per step."""

    def __init__(self, arm: Arm, steps_per_epoch: int, record: Callable[[int, dict[str, float]], None],
                 observer: BatchObserver, generations: int, bar: Any) -> None:  # fmt: skip
        self.arm, self.steps_per_epoch, self.record = arm, steps_per_epoch, record
        self.observer, self.generations, self.bar = observer, generations, bar
        self.started = 0.0
        self.pending: dict[str, float] | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        seconds = time.perf_counter() - self.started
        self.pending = {"step_seconds": seconds, **self.observer.stats(self.generations)}
        self.pending["epoch"] = state.global_step / self.steps_per_epoch
        self.bar.update(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if self.pending is None or logs is None or "loss" not in logs:
            return
        row = self.pending
        row["penalty_mean"] = float(logs.get("meds/penalty_mean", 0.0))
        row["penalized_frac"] = float(logs.get("meds/penalized_frac", 0.0))
        self.pending = None
        self.record(state.global_step, row)


def train_arm(
    arm: Arm, experiment: Experiment, data: TaskData, url: str, bar: Any, out_dir: str
) -> list[dict[str, Any]]:
    """Train one arm from a fresh copy of the starting policy; one row per step (and step 0)."""
    e = experiment
    torch.manual_seed(arm.seed)
    dataset = Dataset.from_dict({
        "prompt": [data.format_prompt(p) for p in data.train],
        "answer": [str(p.answer) for p in data.train],
        "planted": [planted_text(p) for p in data.train],
    })  # fmt: skip
    args = GRPOConfig(
        output_dir=out_dir,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        num_train_epochs=e.epochs,
        max_steps=e.max_steps,
        per_device_train_batch_size=e.prompts_per_step * e.generations,
        num_generations=e.generations,
        max_completion_length=e.max_completion_tokens,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        temperature=1.0,
        top_k=0,
        learning_rate=e.learning_rate,
        scale_rewards=e.scale_rewards,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=arm.seed,
        data_seed=arm.seed,
        reward_weights=[1.0, 1.0, 0.0] if arm.penalty_target else [1.0, 0.0],
    )
    observer = BatchObserver()
    evaluate = Evaluator(data, e)
    train_ids = [prompt_id(data.format_prompt(p)) for p in data.train]
    rows: list[dict[str, Any]] = []
    with MedsClient(url) as client:

        def record(step: int, values: dict[str, float]) -> None:
            model = trainer.model
            row: dict[str, Any] = {"group": arm.group, "arm": arm.name, "seed": arm.seed,
                                   "alpha": arm.alpha, "beta": arm.beta, "step": step, **values}  # fmt: skip
            row.update(evaluate(model, seed=10_000 * arm.seed + step))
            if arm.penalty_target is not None:
                row.update(memory_stats(client, arm.run_id, train_ids))
            rows.append(row)

        policy = data.new_policy()
        if arm.penalty_target is None:
            trainer: GRPOTrainer = GRPOTrainer(
                model=policy, processing_class=data.tokenizer, args=args,
                train_dataset=dataset, reward_funcs=[accuracy, observer],
            )  # fmt: skip
        else:
            client.put_run(arm.run_id, {"penalty_target": arm.penalty_target, "alpha": arm.alpha, "beta": arm.beta})
            meds = MedsPenaltyReward(client, arm.run_id, accuracy=accuracy)
            trainer = MedsGRPOTrainer(
                model=policy, processing_class=data.tokenizer, args=args,
                train_dataset=dataset, reward_funcs=[accuracy, meds, observer],
                meds_last_n_layers=e.last_n_layers,
            )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the progress bar and steps.csv say it
        record(0, {"epoch": 0.0})
        trainer.add_callback(StepRecorder(arm, e.steps_per_epoch, record, observer, e.generations, bar))
        bar.set_postfix_str(f"{arm.group} {arm.name} seed {arm.seed} a={arm.alpha} b={arm.beta}")
        trainer.train()
    return rows


def run_experiment(
    experiment: Experiment,
    out: Path,
    *,
    data: TaskData | None = None,
    progress: bool = True,
    warm_up_cache: Path | None = None,
) -> pd.DataFrame:
    """Warm up once (unless `data` is given), start a live service, train every arm, write `steps.csv`
    and `config.json` to `out`."""
    from .service import live_service

    torch.set_num_threads(experiment.threads)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = data or prepare(experiment, progress, warm_up_cache)
    all_arms = arms(experiment)
    rows: list[dict[str, Any]] = []
    with (
        live_service() as url,
        tempfile.TemporaryDirectory(prefix="meds-exp-trainer-") as scratch,
        tqdm(total=experiment.steps_per_run * len(all_arms), desc="GRPO steps", disable=not progress) as bar,
    ):
        for arm in all_arms:
            rows += train_arm(arm, experiment, data, url, bar, scratch)
            pd.DataFrame(rows).reindex(columns=STEP_COLUMNS).to_csv(out / "steps.csv", index=False)
    frame = pd.DataFrame(rows).reindex(columns=STEP_COLUMNS)
    frame.to_csv(out / "steps.csv", index=False)
    meta = {
        "experiment": asdict(experiment),
        "parameters": data.parameters,
        "warm_up_final_loss": float(np.mean(data.warm_up_loss[-20:])) if data.warm_up_loss else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return frame


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets", "httpx", "meds_client"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="two steps per arm, one seed, no grid")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default experiments/results)")
    parser.add_argument("--seeds", type=int, help="seeds per arm (default 5)")
    parser.add_argument("--epochs", type=int, help="epochs over the training prompts (default 10)")
    parser.add_argument("--no-grid", action="store_true", help="skip the alpha/beta grid")
    parser.add_argument("--grid-seeds", type=int, help="seeds per grid cell (default 3)")
    parser.add_argument("--learning-rate", type=float, help="GRPO learning rate (default 1e-4)")
    parser.add_argument("--scale-rewards", choices=["group", "batch", "none"], help="GRPO reward scaling")
    parser.add_argument("--no-plain", action="store_true", help="skip the timing run without MEDS")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--warm-up-cache", type=Path, help="keep the warmed-up starting policy in this folder")
    parser.add_argument("--max-steps", type=int, help="stop each run after this many steps")
    args = parser.parse_args(argv)
    _quiet()
    experiment = SMOKE if args.smoke else Experiment()
    if args.seeds is not None:
        experiment = replace(experiment, seeds=tuple(range(args.seeds)))
    if args.epochs is not None:
        experiment = replace(experiment, epochs=args.epochs)
    if args.no_grid:
        experiment = replace(experiment, grid=())
    if args.grid_seeds is not None:
        experiment = replace(experiment, grid_seeds=tuple(range(args.grid_seeds)))
    if args.learning_rate is not None:
        experiment = replace(experiment, learning_rate=args.learning_rate)
    if args.scale_rewards is not None:
        experiment = replace(experiment, scale_rewards=args.scale_rewards)
    if args.no_plain:
        experiment = replace(experiment, plain_seed=None)
    if args.max_steps is not None:
        experiment = replace(experiment, max_steps=args.max_steps)
    frame = run_experiment(experiment, args.out, warm_up_cache=args.warm_up_cache)
    if not args.no_plot:
        from .plot import plot_all

        plot_all(frame, args.out, experiment.steps_per_epoch)
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
