"""The MemoryStore contract, run against every store."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from meds_service.core.config import RunConfig
from meds_service.core.errors import StoreUnavailable
from meds_service.core.types import (
    NO_STEP,
    Fit,
    Group,
    KeyAppend,
    MemoryKey,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
)
from meds_service.engine.ports import MemoryStore
from tests.support.records import result_records

W = MemoryKey("p1", Group.WRONG)
C = MemoryKey("p1", Group.CORRECT)
CONFIG = RunConfig(dim=4)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def result(rid: str, size: int = 0, shaped: float | None = None) -> RolloutResult:
    return RolloutResult(rid, RolloutStatus.SCORED, None if size == 0 else 1, size, 0.1 * size, shaped)


def append(key: MemoryKey, first: int, x: np.ndarray, start: int = 0, ids: list[str] | None = None) -> KeyAppend:
    ids = ids or [f"{key.prompt_id}-{int(key.group)}-{first + i}" for i in range(len(x))]
    return KeyAppend(key, first, x, start, ids, result_records([result(i) for i in ids]))


def test_runs_roundtrip_and_delete(store: MemoryStore) -> None:
    assert store.get_run("a") is None and store.list_runs() == []
    record = store.save_run("a", RunConfig(alpha=0.3))
    assert record.name == "a" and record.config.alpha == 0.3 and record.created_at > 0
    store.save_run("a", RunConfig(alpha=0.4))
    again = store.get_run("a")
    assert again is not None and again.config.alpha == 0.4 and again.created_at == record.created_at
    store.save_run("b", RunConfig())
    assert [r.name for r in store.list_runs()] == ["a", "b"]
    assert store.delete_run("a") and not store.delete_run("a")
    assert [r.name for r in store.list_runs()] == ["b"]


def test_commit_load_and_results(store: MemoryStore) -> None:
    v1, v2 = vectors(3, 1), vectors(2, 2)
    results = [result("a"), result("b", 2, 0.5), result("c")]
    store.commit("r", CONFIG, ScoredBatch(
        [KeyAppend(W, 0, v1, 0, ["a", "b", "c"], result_records(results)), append(C, 0, v2[:1])],
        [Fit(C, np.array([-1]), 0, 1)],
    ))  # fmt: skip
    store.commit("r", CONFIG, ScoredBatch([append(W, 3, v2, ids=["d", "e"])]))
    states = store.load_keys("r", None, 4)
    assert set(states) == {W, C}
    assert np.array_equal(states[W].vectors, np.vstack([v1, v2])) and states[W].start == 0 and states[W].n == 5
    assert states[C].labels.tolist() == [-1] and states[C].fitted_upto == 1 and states[W].fitted_upto == 0
    assert list(store.load_keys("r", [C, MemoryKey("nope", Group.WRONG)], 4)) == [C]
    found = store.find_results("r", ["p1"] * 4, ["a", "b", "zzz", "e"])
    assert set(found) == {"a", "b", "e"} and found["b"] == results[1] and found["a"].cluster is None
    assert found["b"].shaped_reward == 0.5 and found["a"].shaped_reward is None
    assert store.find_results("r", ["other-prompt"], ["a"]) == {}  # ids are scoped by prompt
    assert store.find_results("other", ["p1"], ["a"]) == {}
    counts = store.counts("r")
    assert (counts.keys, counts.vectors, counts.rollouts) == (2, 6, 6)
    heads = store.key_heads("r")
    assert heads[W].n == 5 and heads[W].fitted_upto == 0 and heads[C].fitted_upto == 1
    run = store.get_run("r")
    assert run is not None and run.config.dim == 4


def test_many_results_lookup(store: MemoryStore) -> None:
    ids = [f"id-{i}" for i in range(2500)]
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, vectors(2500), ids=ids)]))
    assert len(store.find_results("r", ["p1"] * 2501, [*ids, "missing"])) == 2500


def test_ids_of_any_characters_keep_their_own_results(store: MemoryStore) -> None:
    """Ids travel packed together (one blob per key with their byte lengths): each still finds its own result."""
    ids = ["é", "a b", "7", "日本語", "x" * 512, "nul\x00byte", "12 3", "\U0001f600", "é" * 300]
    results = [result(rid, size=i + 1, shaped=float(i)) for i, rid in enumerate(ids)]
    store.commit("r", CONFIG, ScoredBatch([
        KeyAppend(W, 0, vectors(len(ids)), 0, ids, result_records(results)), append(C, 0, vectors(1), ids=["é "])
    ]))  # fmt: skip
    found = store.find_results("r", ["p1"] * (len(ids) + 2), [*ids, "é ", "e"])
    assert [found[rid] for rid in ids] == results and found["é "].rollout_id == "é " and "e" not in found
    stored = store.prompt_results("r", "p1")
    assert sorted(stored[Group.WRONG]["size"].tolist()) == list(range(1, len(ids) + 1))
    assert len(stored[Group.CORRECT]) == 1


def test_a_batch_out_of_sequence_is_refused_whole(store: MemoryStore) -> None:
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, vectors(1))]))
    with pytest.raises(StoreUnavailable):
        store.commit("r", CONFIG, ScoredBatch([append(C, 0, vectors(1)), append(W, 5, vectors(1))]))
    assert store.counts("r").vectors == 1 and store.counts("r").keys == 1  # atomic: nothing of it stayed
    store.commit("r", CONFIG, ScoredBatch([append(C, 0, vectors(1)), append(W, 1, vectors(1))]))
    assert store.counts("r").vectors == 3


def test_fits_never_go_backwards(store: MemoryStore) -> None:
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, vectors(4))]))
    assert store.save_fits("r", [Fit(W, np.array([0, 0, 1, 1]), 0, 4)]) == 1
    assert store.save_fits("r", [Fit(W, np.array([0, 0]), 0, 2)]) == 0  # older than the stored fit
    assert store.load_keys("r", [W], 4)[W].labels.tolist() == [0, 0, 1, 1]
    assert store.key_heads("r")[W].fitted_upto == 4
    assert store.save_fits("missing", [Fit(W, np.array([0]), 0, 1)]) == 0


def test_capped_memory_forgets_old_vectors_but_not_ids(store: MemoryStore) -> None:
    v = vectors(10, 3)
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, v[:4])]))
    store.commit("r", CONFIG, ScoredBatch([append(W, 4, v[4:7], 2)]))
    store.commit("r", CONFIG, ScoredBatch([append(W, 7, v[7:], 5)]))
    state = store.load_keys("r", [W], 4)[W]
    assert state.start == 5 and state.n == 10 and np.array_equal(state.vectors, v[5:])
    assert store.counts("r").vectors == 5 and store.counts("r").rollouts == 10
    assert "p1-0-0" in store.find_results("r", ["p1"], ["p1-0-0"])  # a retry of an evicted rollout


def test_delete_run_removes_everything(store: MemoryStore) -> None:
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, vectors(2), ids=["a", "b"])]))
    assert store.delete_run("r")
    assert store.load_keys("r", None, 4) == {} and store.find_results("r", ["p1"], ["a"]) == {}
    assert store.counts("r").rollouts == 0 and store.key_heads("r") == {}
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, vectors(1), ids=["a"])]))
    assert store.counts("r").vectors == 1 and "a" in store.find_results("r", ["p1"], ["a"])


def test_ping_and_info(store: MemoryStore) -> None:
    store.ping()
    store.checkpoint()
    assert store.info()["backend"] in ("sqlite", "redis", "redis-cluster")
    assert store.spec().backend in ("sqlite", "redis", "redis-cluster")


def test_steps_are_stored_per_vector(store: MemoryStore) -> None:
    store.commit("r", CONFIG, ScoredBatch([stepped(append(W, 0, vectors(2)), 7), append(C, 0, vectors(1))]))
    store.commit("r", CONFIG, ScoredBatch([stepped(append(W, 2, vectors(3), start=3), 9)]))
    steps = store.load_steps("r", [W, C, MemoryKey("nope", Group.WRONG)])
    assert steps[W].tolist() == [7, 7, 9, 9, 9]  # kept for forgotten vectors too, like their results
    assert steps[C].tolist() == [NO_STEP] and set(steps) == {W, C}


def stepped(append: KeyAppend, step: int) -> KeyAppend:
    return dataclasses.replace(append, step=step)


def test_heads_of_chosen_keys(store: MemoryStore) -> None:
    store.commit("r", CONFIG, ScoredBatch([append(W, 0, vectors(3))], [Fit(W, np.array([0, 0, -1]), 0, 3)]))
    heads = store.heads("r", [W, C])
    assert (heads[W].start, heads[W].n, heads[W].fit_start, heads[W].fitted_upto) == (0, 3, 0, 3)
    assert not heads[W].stale and heads[W].has_fit and heads[C].n == 0 and not heads[C].stale
    assert store.heads("missing", [W])[W].n == 0
