"""The contracts of the engine's smaller ports (conftest.py lists every implementation of each)."""

from __future__ import annotations

import numpy as np
import pytest

from meds_service.core.config import RunConfig
from meds_service.core.errors import NotFound
from meds_service.core.types import Group, KeyRows, MemoryKey, Snapshot
from meds_service.engine.coordination import Coordination
from meds_service.engine.ports import SnapshotStore, VectorIndexes

K = MemoryKey("p", Group.WRONG)


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---- VectorIndexes / VectorIndex ----------------------------------------------------------------------


def test_index_keeps_each_keys_rows_in_order(indexes: VectorIndexes) -> None:
    index = indexes.new(4)
    a, b = unit(20, 4, 1), unit(3, 4, 2)
    index.append(K, a[:15])
    index.append(K, a[15:])
    index.append("other", b)
    assert index.dim == 4 and index.count(K) == 20 and index.count("missing") == 0
    assert np.array_equal(index.rows(K, 0, 20), a) and np.array_equal(index.rows("other", 0, 3), b)
    index.drop_front(K, 5)
    assert index.count(K) == 15 and np.array_equal(index.rows(K, 0, 15), a[5:])
    index.remove("other")
    assert index.count("other") == 0
    assert indexes.device in ("cpu", "cuda") and index.device in ("cpu", "cuda") and index.rounding_safety >= 1


def test_index_search_is_a_descending_inner_product_search(indexes: VectorIndexes) -> None:
    index = indexes.new(8)
    base, queries = unit(30, 8, 3), unit(5, 8, 4)
    index.append(K, base)
    scores, ids = index.search(K, 10, 30, queries, 4)
    assert scores.shape == ids.shape == (5, 4)
    exact = queries @ base[10:].T
    for q in range(5):
        assert np.allclose(scores[q], np.sort(exact[q])[::-1][:4], atol=1e-5)
        assert np.allclose(exact[q, ids[q]], scores[q], atol=1e-5)  # ids count from lo
    few, _ = index.search(K, 0, 2, queries, 4)
    assert few.shape == (5, 2)  # never more neighbours than rows


def test_index_search_many_equals_one_search_per_key(indexes: VectorIndexes) -> None:
    index = indexes.new(8)
    index.append(K, unit(40, 8, 5))
    index.append("small", unit(2, 8, 6))
    queries = unit(12, 8, 7)
    spans = [(K, 5, 40, 0, 4), ("small", 0, 2, 4, 7), (K, 0, 3, 9, 12)]  # rows 7..8 in no span
    scores, ids = index.search_many(spans, queries, 4)
    assert scores.shape == ids.shape == (12, 4)
    for key, lo, hi, q_lo, q_hi in spans:
        one_scores, one_ids = index.search(key, lo, hi, queries[q_lo:q_hi], 4)
        found = one_scores.shape[1]
        assert np.array_equal(scores[q_lo:q_hi, :found], one_scores)
        assert np.array_equal(ids[q_lo:q_hi, :found], one_ids)
        assert np.all(scores[q_lo:q_hi, found:] == -np.inf) and np.all(ids[q_lo:q_hi, found:] == -1)
    assert np.all(scores[7:9] == -np.inf) and np.all(ids[7:9] == -1)


# ---- SnapshotStore ------------------------------------------------------------------------------------


def test_snapshots_roundtrip_and_missing_is_none(snapshots: SnapshotStore) -> None:
    assert snapshots.read("r") is None
    rows = KeyRows(K, 2, 5, unit(3, 4, 5))
    snapshots.write(Snapshot("r", 12.5, 4, [rows]))
    read = snapshots.read("r")
    assert read is not None and (read.run, read.created_at, read.dim) == ("r", 12.5, 4)
    assert read.keys[0].key == K and (read.keys[0].start, read.keys[0].n) == (2, 5)
    assert np.array_equal(read.keys[0].rows, rows.rows)
    assert snapshots.read("other") is None


# ---- Coordination -------------------------------------------------------------------------------------


def test_runs_are_created_found_and_deleted(coordination: Coordination) -> None:
    assert coordination.load() == [] and coordination.names() == []
    with pytest.raises(NotFound):
        coordination.run("a")
    created = coordination.create("a", lambda: RunConfig(alpha=0.3))
    assert created is not None and created.config.alpha == 0.3
    assert coordination.create("a", RunConfig) is None  # exists: the caller updates it instead
    run = coordination.run("a")
    assert run.name == "a" and coordination.alive(run)
    assert coordination.run("b", create=True).config == RunConfig()
    assert coordination.names() == ["a", "b"]
    assert not coordination.has_memory(run) and coordination.counts(run) == (0, 0, 0, 0)
    assert coordination.refit_scope(run, everything=True) == ([], 0)
    with coordination.locked("a", ["p1", "p2"]):
        pass
    coordination.delete("a")
    assert coordination.names() == ["b"] and not coordination.alive(run)
    with pytest.raises(NotFound):
        coordination.delete("a")
    assert coordination.totals() == (0, 0, 0, 0)
