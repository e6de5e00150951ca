"""The error-collapse metrics as pure functions, against values worked out by hand and a plain-Python
re-computation on random batches."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from meds_service.core.collapse import COUNTS, NAMES, CollapseMetrics, batch_metrics, cluster_shape, combine

NONE = -(2**31)  # no fit yet: a first visit


def plain(
    prompts: list[str], wrong: list[bool], kept: list[bool], clusters: list[int], penalties: list[float]
) -> dict[str, float]:
    """The definitions of docs/architecture.md, "Error collapse", one rollout at a time."""
    rows = [i for i in range(len(prompts)) if kept[i]]
    wrongs = [i for i in rows if wrong[i]]
    per_prompt: dict[str, list[int]] = {}
    for i in wrongs:
        if clusters[i] != NONE:
            per_prompt.setdefault(prompts[i], []).append(clusters[i])
    distinct, largest, entropy = [], [], []
    for labels in per_prompt.values():
        real = Counter(label for label in labels if label >= 0)
        n = len(labels)
        distinct.append(len(real))
        largest.append(max(real.values()) / n if real else 0.0)
        sizes = list(real.values()) + [1] * sum(1 for label in labels if label < 0)
        entropy.append(-sum(s / n * math.log(s / n) for s in sizes))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "repeat_rate": mean([1.0 if clusters[i] >= 0 else 0.0 for i in wrongs]),
        "distinct_error_clusters": mean(distinct),
        "largest_cluster_share": mean(largest),
        "cluster_entropy": mean(entropy),
        "penalised_fraction": mean([1.0 if penalties[i] > 0 else 0.0 for i in rows]),
        "mean_penalty": mean([penalties[i] for i in rows]),
    }


def metrics_of(
    prompts: list[str], wrong: list[bool], kept: list[bool], clusters: list[int], penalties: list[float]
) -> CollapseMetrics:
    return batch_metrics(
        prompts, np.array(wrong), np.array(kept), np.array(clusters, np.int64), np.array(penalties), NONE
    )


def test_a_worked_example() -> None:
    # prompt a: 4 wrong judged (cluster 0 twice, cluster 1, noise); prompt b: 2 wrong on a first visit;
    # a correct rollout with a penalty; a skipped wrong rollout (not remembered) is left out everywhere
    prompts = ["a", "a", "a", "a", "b", "b", "a", "a"]
    wrong = [True, True, True, True, True, True, False, True]
    kept = [True, True, True, True, True, True, True, False]
    clusters = [0, 0, 1, -1, NONE, NONE, 0, 5]
    penalties = [0.1, 0.1, 0.05, 0.0, 0.0, 0.0, 0.2, 0.0]
    m = metrics_of(prompts, wrong, kept, clusters, penalties)
    assert m.repeat_rate == pytest.approx(3 / 6)  # 3 of 6 remembered wrong rollouts fell into a real cluster
    assert m.distinct_error_clusters == 2  # only prompt a is judged: clusters 0 and 1
    assert m.largest_cluster_share == pytest.approx(2 / 4)
    assert m.cluster_entropy == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert m.penalised_fraction == pytest.approx(4 / 7)
    assert m.mean_penalty == pytest.approx(0.45 / 7)
    assert (m.wrong_rollouts, m.judged_prompts, m.remembered_rollouts) == (6, 1, 7)


def test_keys_are_fixed_and_zero_without_data() -> None:
    m = metrics_of([], [], [], [], [])
    assert list(m.metrics()) == list(NAMES) and list(m.counts()) == list(COUNTS)
    assert set(m.metrics().values()) == {0.0}
    only_first_visits = metrics_of(["a", "a"], [True, True], [True, True], [NONE, NONE], [0.0, 0.0])
    assert only_first_visits.repeat_rate == 0 and only_first_visits.judged_prompts == 0
    assert only_first_visits.wrong_rollouts == 2


def test_collapse_into_one_cluster_against_spread_errors() -> None:
    collapsed = metrics_of(["a"] * 8, [True] * 8, [True] * 8, [3] * 8, [0.2] * 8)
    spread = metrics_of(["a"] * 8, [True] * 8, [True] * 8, [0, 1, 2, 3, -1, -1, -1, -1], [0.1] * 8)
    assert collapsed.largest_cluster_share == 1 and collapsed.cluster_entropy == 0
    assert collapsed.distinct_error_clusters == 1
    assert spread.largest_cluster_share == pytest.approx(1 / 8)
    assert spread.cluster_entropy == pytest.approx(math.log(8))  # every rollout a class of its own
    assert spread.repeat_rate == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_equal_to_a_plain_recomputation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    prompts = [f"p{int(i)}" for i in rng.integers(0, 12, n)]
    wrong = rng.random(n) < 0.6
    kept = rng.random(n) < 0.9
    clusters = np.where(rng.random(n) < 0.15, NONE, rng.integers(-1, 4, n))
    penalties = np.where(rng.random(n) < 0.5, rng.random(n) * 0.2, 0.0)
    got = metrics_of(prompts, wrong.tolist(), kept.tolist(), clusters.tolist(), penalties.tolist())
    want = plain(prompts, wrong.tolist(), kept.tolist(), clusters.tolist(), penalties.tolist())
    assert got.metrics() == pytest.approx(want)


def test_answers_of_a_split_batch_combine_to_the_whole() -> None:
    rng = np.random.default_rng(9)
    n = 200
    prompt_no = rng.integers(0, 10, n)
    prompts = [f"p{int(i)}" for i in prompt_no]
    wrong, kept = rng.random(n) < 0.6, rng.random(n) < 0.9
    clusters = np.where(rng.random(n) < 0.15, NONE, rng.integers(-1, 4, n))
    penalties = rng.random(n) * 0.2 * (rng.random(n) < 0.5)
    whole = metrics_of(prompts, wrong.tolist(), kept.tolist(), clusters.tolist(), penalties.tolist())
    parts = []
    for half in (prompt_no < 5, prompt_no >= 5):  # split by prompt, as the client does
        idx = np.flatnonzero(half)
        part = [prompts[i] for i in idx], wrong[idx].tolist(), kept[idx].tolist(), clusters[idx].tolist()
        parts.append(metrics_of(*part, penalties[idx].tolist()))
    assert combine(parts).metrics() == pytest.approx(whole.metrics())
    assert combine(parts).counts() == whole.counts()


def test_cluster_shape_per_group() -> None:
    shape = cluster_shape(np.array([0, 0, 0, 2, 2]), np.array([1, 1, -1, 0, 1]), 3)
    assert shape.rollouts.tolist() == [3, 0, 2]
    assert shape.distinct.tolist() == [1, 0, 2]
    assert shape.noise.tolist() == [1, 0, 0]
    assert shape.largest_share.tolist() == pytest.approx([2 / 3, 0, 0.5])
    assert shape.entropy.tolist() == pytest.approx([-(2 / 3 * math.log(2 / 3)) + math.log(3) / 3, 0, math.log(2)])


@pytest.mark.parametrize("seed", range(6))
def test_prompts_are_taken_in_sorted_order_bit_for_bit(seed: int) -> None:
    """The per-prompt values are averaged in sorted prompt order (as np.unique codes them), so the metrics are
    the same to the last bit whatever order the prompts arrive in (in order of arrival, seeds 2 and 4 differ
    in the last bit)."""
    rng = np.random.default_rng(seed)
    n = 4000
    prompts = [f"prompt-{int(i)}" for i in rng.integers(0, 300, n)]
    wrong, kept = rng.random(n) < 0.6, np.ones(n, dtype=bool)
    clusters = rng.integers(-1, 6, n)
    penalties = rng.random(n) * 0.2
    got = metrics_of(prompts, wrong.tolist(), kept.tolist(), clusters.tolist(), penalties.tolist())
    rows = np.flatnonzero(wrong)
    _, codes = np.unique(np.asarray(prompts, dtype=object)[rows], return_inverse=True)
    shape = cluster_shape(codes.astype(np.int64), clusters[rows], int(codes.max()) + 1)
    assert got.largest_cluster_share == float(np.mean(shape.largest_share))
    assert got.cluster_entropy == float(np.mean(shape.entropy))
    assert got.distinct_error_clusters == float(np.mean(shape.distinct))
    reversed_rows = metrics_of(
        prompts[::-1], wrong[::-1].tolist(), kept.tolist(), clusters[::-1].tolist(), penalties[::-1].tolist()
    )
    assert reversed_rows.cluster_entropy == got.cluster_entropy
