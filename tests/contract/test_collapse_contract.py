"""Error collapse on every store: each answer's metrics follow from the answer itself, observe-only runs
measure the same collapse without shaping, and the run summary, the prompt ranking and a prompt's view
equal a plain re-computation from the prompts' memory (docs/architecture.md, "Error collapse")."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from meds_service.core.types import STATUSES, Group, RolloutStatus, ScoreOutcome
from meds_service.engine import ErrorMemory
from meds_service.engine.summary import CollapseViews, prompt_collapse
from tests.unit.test_collapse import plain
from tests.unit.test_engine import grid_trace, to_batch

SKIPPED = STATUSES.index(RolloutStatus.SKIPPED)


def expected(outcome: ScoreOutcome, prompts: list[str], groups: np.ndarray) -> dict[str, float]:
    records = outcome.records
    return plain(
        prompts,
        (groups == int(Group.WRONG)).tolist(),
        (outcome.status != SKIPPED).tolist(),
        records["cluster"].tolist(),
        records["penalty"].tolist(),
    )


def test_every_answer_carries_its_batch_metrics(engine: ErrorMemory) -> None:
    judged = 0
    for step, rollouts in enumerate(grid_trace(21, 6, prompts=4, per_prompt=10)):
        batch = dataclasses.replace(to_batch(rollouts, 3), step=step)
        outcome = engine.score("m", batch)
        assert outcome.metrics.metrics() == pytest.approx(expected(outcome, batch.prompt_ids, batch.groups))
        judged += outcome.metrics.judged_prompts
        again = engine.score("m", batch)  # a retry: every rollout a duplicate, the same numbers
        assert again.metrics == outcome.metrics
    assert judged > 0


def test_observe_only_measures_the_same_collapse_without_shaping(engine: ErrorMemory) -> None:
    engine.put_config("watch", {"penalty_target": "none"})
    seen = []
    for step, rollouts in enumerate(grid_trace(22, 6, prompts=4, per_prompt=10)):
        batch = dataclasses.replace(to_batch(rollouts, 3), step=step)
        shaped, watched = engine.score("shaped", batch), engine.score("watch", batch)
        assert watched.records["penalty"].tolist() == [0.0] * len(batch)
        assert watched.metrics.penalised_fraction == 0 and watched.metrics.mean_penalty == 0
        for name in ("repeat_rate", "distinct_error_clusters", "largest_cluster_share", "cluster_entropy"):
            assert getattr(watched.metrics, name) == getattr(shaped.metrics, name)
        seen.append(watched.metrics.repeat_rate)
    assert max(seen) > 0  # wrong keys are fitted and judged under "none" too


def test_summary_ranking_and_prompt_view_follow_the_memory(engine: ErrorMemory) -> None:
    for step, rollouts in enumerate(grid_trace(23, 8, prompts=6, per_prompt=10)):
        engine.score("h", dataclasses.replace(to_batch(rollouts, 3), step=10 + step))
    engine.recluster("h", everything=True)
    wrong = {}
    for p in sorted({f"p{i}" for i in range(6)}):
        groups = engine.prompt("h", p)["groups"]
        if "wrong" in groups and groups["wrong"]["labels"]:
            wrong[p] = list(zip(groups["wrong"]["steps"], groups["wrong"]["labels"], strict=True))
    views = CollapseViews(engine)

    summary = views.summary("h")
    series = summary["series"]
    assert summary["wrong_vectors"] == sum(len(v) for v in wrong.values())
    for i, step in enumerate(series["step"]):
        at = {p: [label for s, label in pairs if s == step] for p, pairs in wrong.items()}
        at = {p: labels for p, labels in at.items() if labels}
        first = {
            (p, label): min(s for s, lab in pairs if lab == label) for p, pairs in wrong.items() for _, label in pairs
        }
        n = sum(len(labels) for labels in at.values())
        assert series["wrong_rollouts"][i] == n and series["prompts"][i] == len(at)
        repeats = sum(1 for p, labels in at.items() for label in labels if label >= 0 and first[(p, label)] < step)
        assert series["repeat_rate"][i] == pytest.approx(repeats / n)
        shares = [
            max(Counter(lab for lab in labels if lab >= 0).values(), default=0) / len(labels) for labels in at.values()
        ]
        assert series["largest_cluster_share"][i] == pytest.approx(sum(shares) / len(shares))
        noise = sum(1 for labels in at.values() for label in labels if label < 0)
        assert series["noise_share"][i] == pytest.approx(noise / n)

    page = views.ranked("h", "collapse", 0, 3)
    assert page["total"] == len(wrong) and len(page["prompts"]) == min(3, len(wrong))

    def share(pairs: list[tuple[int, int]]) -> float:
        labels = [label for _, label in pairs]
        return max(Counter(lab for lab in labels if lab >= 0).values(), default=0) / len(labels)

    ranked = sorted(wrong, key=lambda p: (-share(wrong[p]), -len(wrong[p]), p))
    assert [row["prompt_id"] for row in page["prompts"]] == ranked[:3]
    rest = views.ranked("h", "collapse", 3, 50)
    assert [row["prompt_id"] for row in rest["prompts"]] == ranked[3:]
    top = page["prompts"][0]
    assert top["largest_cluster_share"] == pytest.approx(share(wrong[top["prompt_id"]]))
    assert top["fitted"] == len(wrong[top["prompt_id"]])

    p = top["prompt_id"]
    view = prompt_collapse(engine, "h", p)["groups"]["wrong"]
    pairs = wrong[p]
    assert view["noise_share"] == pytest.approx(sum(1 for _, label in pairs if label < 0) / len(pairs))
    for label, cluster in view["clusters"].items():
        mine = [s for s, lab in pairs if str(lab) == label]
        assert cluster["size"] == len(mine) and sum(cluster["sizes"]) == len(mine)
        assert (cluster["first_step"], cluster["last_step"]) == (min(mine), max(mine))
        assert cluster["sizes"] == [mine.count(s) for s in view["steps"]]
    histogram = view["penalties"]
    assert histogram["zero"] + sum(histogram["counts"]) == view["rollouts"] >= len(pairs)


def test_a_prompts_stored_results_are_its_answers(engine: ErrorMemory) -> None:
    answered: dict[int, list[float]] = {}
    for rollouts in grid_trace(24, 4, prompts=3, per_prompt=6):
        batch = to_batch(rollouts, 3)
        outcome = engine.score("r", batch)
        for i, prompt in enumerate(batch.prompt_ids):
            if prompt == "p1" and outcome.status[i] != SKIPPED:
                answered.setdefault(int(batch.groups[i]), []).append(float(outcome.records["penalty"][i]))
    stored = engine.store.prompt_results("r", "p1")
    assert {int(g): sorted(r["penalty"].tolist()) for g, r in stored.items()} == {
        g: sorted(v) for g, v in answered.items()
    }
    assert all(r.dtype.names == ("cluster", "size", "penalty", "shaped") for r in stored.values())
    assert engine.store.prompt_results("r", "nobody") == {}


def test_texts_are_kept_truncated_only_when_asked_and_go_with_the_run(engine: ErrorMemory) -> None:
    engine.put_config("t", {"text_max_chars": 6})
    for step, rollouts in enumerate(grid_trace(25, 4, prompts=2, per_prompt=6)):
        batch = to_batch(rollouts, 3)
        texts: list[str | None] = [f"answer {r.rollout_id} " * 3 if i % 5 else None for i, r in enumerate(rollouts)]
        engine.score("t", dataclasses.replace(batch, step=step, texts=texts))
        engine.score("plain", dataclasses.replace(batch, step=step, texts=texts))  # text_max_chars 0: kept nowhere
    engine.recluster("t", everything=True)
    engine.recluster("plain", everything=True)
    view = prompt_collapse(engine, "t", "p0")["groups"]
    examples = [
        text for group in view.values() for cluster in group["clusters"].values() for text in cluster["examples"]
    ]
    assert examples and all(text == "answer" for text in examples)  # truncated to 6 characters
    assert all(len(c["examples"]) <= 3 for group in view.values() for c in group["clusters"].values())
    plain_view = prompt_collapse(engine, "plain", "p0")["groups"]
    assert all(not c["examples"] for group in plain_view.values() for c in group["clusters"].values())

    key = next(k for k in engine.store.list_keys("t") if k.prompt_id == "p0")
    assert any(engine.store.load_texts("t", key, list(range(6))))
    engine.delete("t")
    assert engine.store.load_texts("t", key, list(range(6))) == [None] * 6
