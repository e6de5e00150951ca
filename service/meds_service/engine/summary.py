"""Error collapse of a whole run, for the summary, the prompt ranking and the explorer (docs/architecture.md,
"Error collapse").

A score answer's metrics judge each rollout as it arrived. A run's history is read from its memory: the
labels of every wrong key's last fit, joined to the step each vector was stored at. One flat table of the
run's fitted wrong vectors (prompt, label, step) is built in numpy and kept until the run changes, so the
summary and every page of the ranking cost one pass over it, not one per prompt.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from ..core.collapse import batch_metrics, cluster_shape
from ..core.errors import InvalidInput, NotFound
from ..core.types import NO_CLUSTER32, NO_STEP, STATUSES, Group, MemoryKey, RolloutBatch, RolloutStatus, ScoreOutcome
from .ports import EngineObserver

if TYPE_CHECKING:
    from .memory import ErrorMemory

SKIPPED = STATUSES.index(RolloutStatus.SKIPPED)
SortKey = Literal["collapse", "clusters", "rollouts", "prompt"]
SORTS: tuple[str, ...] = ("collapse", "clusters", "rollouts", "prompt")
PENALTY_BINS = 10
EXAMPLES_PER_CLUSTER = 3  # the most recent texts of each cluster, when the run keeps texts


def with_metrics(outcome: ScoreOutcome, batch: RolloutBatch, observer: EngineObserver, run: str) -> ScoreOutcome:
    """The answer with its batch's error-collapse metrics; the observer sees them too."""
    remembered = outcome.status != SKIPPED
    metrics = batch_metrics(
        batch.prompt_ids,
        batch.groups == int(Group.WRONG),
        remembered,
        outcome.records["cluster"].astype(np.int64),
        outcome.records["penalty"].astype(np.float64),
        NO_CLUSTER32,
    )
    if metrics.remembered_rollouts:
        observer.collapse(run, metrics)
    return dataclasses.replace(outcome, metrics=metrics)


@dataclass
class CollapseTable:
    """A run's fitted wrong vectors: `prompt[i]` (index into `prompts`), `label[i]`, `step[i]` (NO_STEP
    where none was stored), and per prompt the vectors it holds and how many await a refit."""

    prompts: list[str]
    prompt: NDArray[np.int64]
    label: NDArray[np.int64]
    step: NDArray[np.int64]
    live: NDArray[np.int64]
    pending: NDArray[np.bool_]
    derived: dict[str, Any] = dataclasses.field(default_factory=dict)  # summary and rows, computed once


class CollapseViews:
    """Builds and caches each run's table; answers the summary and the ranking from it."""

    def __init__(self, engine: ErrorMemory) -> None:
        self.engine = engine
        self._cache: dict[str, tuple[tuple[float, int, int], CollapseTable]] = {}
        self._lock = threading.Lock()

    def table(self, name: str) -> CollapseTable:
        engine = self.engine
        run = engine.coordination.run(name)
        with run.lock:
            keys = [k for k in engine.store.list_keys(name) if k.group == Group.WRONG]
            engine.coordination.refresh(run, run.config, keys)
            held = {k: run.keys[k] for k in keys if k in run.keys}
            version = (run.created_at, run.version, sum(c.fitted_upto + c.fit_start for c in held.values()))
            with self._lock:
                cached = self._cache.get(name)
            if cached is not None and cached[0] == version:
                return cached[1]
            fits = {k: (c.labels, c.fit_start, c.fitted_upto, c.live, k in run.pending) for k, c in held.items()}
        steps = engine.store.load_steps(name, list(fits))  # steps are append-only: no lock needed
        table = _build(fits, steps)
        with self._lock:
            self._cache[name] = (version, table)
            for other in set(self._cache) - set(engine.run_names()):
                del self._cache[other]
        return table

    def summary(self, name: str) -> dict[str, Any]:
        table = self.table(name)
        if "summary" not in table.derived:
            table.derived["summary"] = summary_of(name, table)
        return dict(table.derived["summary"])

    def ranked(self, name: str, sort: str, offset: int, limit: int) -> dict[str, Any]:
        if sort not in SORTS:
            raise InvalidInput(f"sort must be one of {', '.join(SORTS)}")
        return ranked_prompts(name, self.table(name), sort, offset, limit)


def _build(
    fits: dict[MemoryKey, tuple[NDArray[np.int64], int, int, int, bool]], steps: dict[MemoryKey, NDArray[np.int64]]
) -> CollapseTable:
    prompts = sorted(k.prompt_id for k in fits)
    code = {p: i for i, p in enumerate(prompts)}
    parts_p, parts_l, parts_s = [], [], []
    live = np.zeros(len(prompts), dtype=np.int64)
    pending = np.zeros(len(prompts), dtype=bool)
    for key, (labels, fit_start, fitted_upto, n_live, is_pending) in fits.items():
        i = code[key.prompt_id]
        live[i], pending[i] = n_live, is_pending
        if not len(labels):
            continue
        stored = steps.get(key, np.zeros(0, np.int64))
        fitted = np.full(len(labels), NO_STEP, dtype=np.int64)
        recorded = stored[fit_start:fitted_upto]
        fitted[: len(recorded)] = recorded
        parts_p.append(np.full(len(labels), i, dtype=np.int64))
        parts_l.append(np.asarray(labels, dtype=np.int64))
        parts_s.append(fitted)
    empty = np.zeros(0, np.int64)
    return CollapseTable(
        prompts,
        np.concatenate(parts_p) if parts_p else empty,
        np.concatenate(parts_l) if parts_l else empty,
        np.concatenate(parts_s) if parts_s else empty,
        live,
        pending,
    )


def summary_of(name: str, table: CollapseTable) -> dict[str, Any]:
    """Per training step, over the run's fitted wrong vectors stored at that step (see the docs for each)."""
    stepped = table.step != NO_STEP
    prompt, label, step = table.prompt[stepped], table.label[stepped], table.step[stepped]
    steps, step_code = np.unique(step, return_inverse=True)
    # a vector repeats when its cluster (prompt, label) already held a vector at an earlier step
    real = label >= 0
    repeats = np.zeros(len(step), dtype=bool)
    if real.any():
        span = int(label[real].max()) + 1
        _, cluster_code = np.unique(prompt[real] * span + label[real], return_inverse=True)
        cluster_code = cluster_code.reshape(-1)
        first = np.full(int(cluster_code.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, cluster_code, step[real])
        repeats[np.flatnonzero(real)] = step[real] > first[cluster_code]
    # the spread of each (step, prompt) over labels
    sp = step_code.astype(np.int64) * max(len(table.prompts), 1) + prompt
    uniq_sp, sp_code = np.unique(sp, return_inverse=True)
    shape = cluster_shape(sp_code.reshape(-1).astype(np.int64), label, len(uniq_sp))
    sp_step = (uniq_sp // max(len(table.prompts), 1)).astype(np.int64)
    n_steps = len(steps)
    per_step_prompts = np.bincount(sp_step, minlength=n_steps)

    def mean_by_step(values: NDArray[np.generic]) -> list[float]:
        sums = np.bincount(sp_step, weights=values.astype(np.float64), minlength=n_steps)
        return [float(v) for v in sums / np.maximum(per_step_prompts, 1)]

    wrong = np.bincount(step_code.reshape(-1), minlength=n_steps)
    repeat = np.bincount(step_code.reshape(-1), weights=repeats, minlength=n_steps)
    noise = np.bincount(step_code.reshape(-1), weights=label < 0, minlength=n_steps)
    series = {
        "step": steps.tolist(),
        "wrong_rollouts": wrong.tolist(),
        "prompts": per_step_prompts.tolist(),
        "repeat_rate": (repeat / np.maximum(wrong, 1)).tolist(),
        "distinct_error_clusters": mean_by_step(shape.distinct),
        "largest_cluster_share": mean_by_step(shape.largest_share),
        "cluster_entropy": mean_by_step(shape.entropy),
        "noise_share": (noise / np.maximum(wrong, 1)).tolist(),
    }
    return {
        "run": name,
        "prompts": len(table.prompts),
        "wrong_vectors": len(table.label),
        "unstepped_vectors": int((~stepped).sum()),
        "series": series,
    }


def prompt_rows(table: CollapseTable) -> dict[str, NDArray[Any]]:
    """Per prompt, over its last fit: the columns of the ranking (computed once per table)."""
    if "rows" not in table.derived:
        table.derived["rows"] = _prompt_rows(table)
    rows: dict[str, NDArray[Any]] = table.derived["rows"]
    return rows


def _prompt_rows(table: CollapseTable) -> dict[str, NDArray[Any]]:
    n = len(table.prompts)
    shape = cluster_shape(table.prompt, table.label, n)
    return {
        "fitted": shape.rollouts,
        "clusters": shape.distinct,
        "largest_cluster_share": shape.largest_share,
        "cluster_entropy": shape.entropy,
        "noise_share": shape.noise / np.maximum(shape.rollouts, 1),
        "first_step": _by_prompt(table, np.minimum, np.iinfo(np.int64).max),
        "last_step": _by_prompt(table, np.maximum, NO_STEP),
    }


def _by_prompt(table: CollapseTable, op: np.ufunc, fill: int) -> NDArray[np.int64]:
    out = np.full(len(table.prompts), fill, dtype=np.int64)
    stepped = table.step != NO_STEP
    op.at(out, table.prompt[stepped], table.step[stepped])
    return out


def ranked_prompts(name: str, table: CollapseTable, sort: str, offset: int, limit: int) -> dict[str, Any]:
    """One page of the run's prompts, most collapsed first (`collapse`: the largest cluster's share of the
    prompt's fitted wrong vectors, ties by more vectors); or by cluster count, by vectors, or by id."""
    rows = prompt_rows(table)
    n = len(table.prompts)
    order = table.derived.get(f"order:{sort}")
    if order is None:
        index = np.arange(n)
        if sort == "collapse":
            order = np.lexsort((index, -rows["fitted"], -rows["largest_cluster_share"]))
        elif sort == "clusters":
            order = np.lexsort((index, -rows["fitted"], -rows["clusters"]))
        elif sort == "rollouts":
            order = np.lexsort((index, -rows["fitted"]))
        else:
            order = index
        table.derived[f"order:{sort}"] = order
    page = order[offset : offset + limit].tolist()
    no_step = np.iinfo(np.int64).max
    items = []
    for i in page:
        first, last = int(rows["first_step"][i]), int(rows["last_step"][i])
        items.append(
            {
                "prompt_id": table.prompts[i],
                "fitted": int(rows["fitted"][i]),
                "vectors": int(table.live[i]),
                "pending_refit": bool(table.pending[i]),
                "clusters": int(rows["clusters"][i]),
                "largest_cluster_share": float(rows["largest_cluster_share"][i]),
                "cluster_entropy": float(rows["cluster_entropy"][i]),
                "noise_share": float(rows["noise_share"][i]),
                "first_step": None if first == no_step else first,
                "last_step": None if last == NO_STEP else last,
            }
        )
    return {"run": name, "sort": sort, "offset": offset, "limit": limit, "total": n, "prompts": items}


def clusters_over_steps(labels: Sequence[int], steps: Sequence[int | None]) -> dict[str, Any]:
    """A group's last fit read over steps: per label its size at every step and first and last step."""
    label = np.asarray(labels, dtype=np.int64)
    step = np.array([NO_STEP if s is None else s for s in steps], dtype=np.int64)
    known = step != NO_STEP
    all_steps = np.unique(step[known])
    out: dict[str, Any] = {"steps": all_steps.tolist(), "clusters": {}}
    for value in np.unique(label).tolist():
        mine = label == value
        seen = step[mine & known]
        per_step = np.searchsorted(all_steps, seen)
        out["clusters"][str(value)] = {
            "size": int(mine.sum()),
            "sizes": np.bincount(per_step, minlength=len(all_steps)).tolist(),
            "first_step": int(seen.min()) if len(seen) else None,
            "last_step": int(seen.max()) if len(seen) else None,
        }
    return out


def penalty_histogram(penalties: NDArray[np.float64], beta: float) -> dict[str, Any]:
    """Penalties of a prompt's remembered rollouts in PENALTY_BINS equal bins over [0, beta] (zeros apart)."""
    top = max(beta, float(penalties.max()) if len(penalties) else 0.0, 1e-12)
    positive = penalties[penalties > 0]
    counts, edges = np.histogram(positive, bins=PENALTY_BINS, range=(0.0, top))
    return {"zero": int((penalties <= 0).sum()), "edges": edges.tolist(), "counts": counts.tolist()}


def _examples(
    engine: ErrorMemory, name: str, key: MemoryKey, labels: list[int], fit_start: int
) -> dict[int, list[str]]:
    """Up to EXAMPLES_PER_CLUSTER stored texts per label, the most recent first."""
    picks: dict[int, list[int]] = {}
    for offset in range(len(labels) - 1, -1, -1):
        chosen = picks.setdefault(labels[offset], [])
        if len(chosen) < EXAMPLES_PER_CLUSTER:
            chosen.append(fit_start + offset)
    seqs = [s for chosen in picks.values() for s in chosen]
    texts = dict(zip(seqs, engine.store.load_texts(name, key, seqs), strict=True))
    return {label: [t for s in chosen if (t := texts[s]) is not None] for label, chosen in picks.items()}


def prompt_collapse(engine: ErrorMemory, name: str, prompt_id: str) -> dict[str, Any]:
    """The explorer's view of one prompt: its memory per group with clusters over steps, the penalties its
    rollouts got, and the share of its fitted wrong vectors that are noise."""
    run = engine.coordination.run(name)
    with run.lock:  # the labels and the sequence numbers they start at, from one state of the cache
        memory = engine.prompt(name, prompt_id)
        fit_starts = {k.group.wire: c.fit_start for k, c in run.keys.items() if k.prompt_id == prompt_id}
    results = engine.store.prompt_results(name, prompt_id)
    beta = engine.config(name).beta
    groups = {}
    for wire, view in memory["groups"].items():
        labels = view["labels"]
        noise = sum(1 for label in labels if label < 0)
        records = results.get(Group[wire.upper()])
        penalties = records["penalty"].astype(np.float64) if records is not None else np.zeros(0)
        groups[wire] = {
            "vectors": view["vectors"],
            "fitted": view["fitted"],
            "pending_refit": view["pending_refit"],
            "noise_share": noise / len(labels) if labels else 0.0,
            "rollouts": len(penalties),
            "penalties": penalty_histogram(penalties, beta),
            **clusters_over_steps(labels, view["steps"]),
        }
        examples = _examples(engine, name, MemoryKey(prompt_id, Group[wire.upper()]), labels, fit_starts[wire])
        for label, cluster in groups[wire]["clusters"].items():
            cluster["examples"] = examples.get(int(label), [])
    if not groups:
        raise NotFound(f"run {name!r} has no memory of prompt {prompt_id!r}")
    return {"run": name, "prompt_id": prompt_id, "groups": groups}
