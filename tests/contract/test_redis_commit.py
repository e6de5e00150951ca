"""How much of a batch a refused commit keeps: nothing on a single Redis (one script per batch), the other
prompts on a Redis Cluster (one script per prompt), with the run's counters, key set and refit queue
matching what was stored."""

from __future__ import annotations

import numpy as np
import pytest

from meds_service.core.errors import IdCollision, StoreUnavailable
from meds_service.core.records import KeyHead
from meds_service.core.types import Group, MemoryKey, ScoredBatch
from meds_service.storage.redis import _TABLE_MARK, RedisStore
from tests.contract.test_store_contract import CONFIG, append, vectors
from tests.support.queue import queue_length

A = MemoryKey("prompt-a", Group.WRONG)
B = MemoryKey("prompt-b", Group.WRONG)


def test_a_refused_prompt_refuses_the_batch_or_only_itself(redis_store: RedisStore) -> None:
    redis_store.ensure_queue()
    redis_store.commit("r", CONFIG, ScoredBatch([append(A, 0, vectors(2))], [], [A]))
    assert queue_length(redis_store) == 1
    out_of_sequence = ScoredBatch([append(B, 0, vectors(3)), append(A, 7, vectors(1))], [], [A, B])
    with pytest.raises(StoreUnavailable, match="changed under this batch"):
        redis_store.commit("r", CONFIG, out_of_sequence)
    counts = redis_store.counts("r")
    if redis_store.cluster:  # prompt-b's script ran; prompt-a's was refused whole
        assert (counts.keys, counts.vectors, counts.rollouts) == (2, 5, 5)
        assert redis_store.list_keys("r") == [A, B] and redis_store.list_keys("r", pending_only=True) == [A, B]
        assert queue_length(redis_store) == 2 and redis_store.heads("r", [A, B])[B].n == 3
    else:
        assert (counts.keys, counts.vectors, counts.rollouts) == (1, 2, 2)
        assert redis_store.list_keys("r") == [A] and queue_length(redis_store) == 1
    assert redis_store.heads("r", [A])[A].n == 2


def test_a_prompts_ids_hash_is_a_table_from_its_first_write(redis_store: RedisStore) -> None:
    """A listpack (Redis's encoding of small hashes) is searched linearly by every HSET and HMGET; the mark
    keeps a prompt's ids hash a table, and no reader takes it for a rollout."""
    redis_store.commit("r", CONFIG, ScoredBatch([append(A, 0, vectors(2)), append(B, 0, vectors(1))]))
    redis_store.commit(
        "r",
        CONFIG,
        ScoredBatch([append(A, 2, vectors(1)), append(MemoryKey("prompt-a", Group.CORRECT), 0, vectors(1))]),
    )
    for prompt in ("prompt-a", "prompt-b"):
        ids = redis_store._prompt_key("r", prompt, "ids")
        assert redis_store._r.object("encoding", ids) == b"hashtable"
        assert redis_store._r.hget(ids, "") == _TABLE_MARK and len(_TABLE_MARK) > 64
    stored = redis_store.prompt_results("r", "prompt-a")
    assert {group: len(records) for group, records in stored.items()} == {Group.WRONG: 3, Group.CORRECT: 1}
    assert redis_store.find_results("r", ["prompt-a"], [""]) == {}


def test_changes_read_a_chunk_of_keys_in_one_script(redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync reads its keys' heads, rows and fits in one script per chunk (per key on a cluster), where it
    was a pipelined command or two per key; what it reads is unchanged."""
    keys = [MemoryKey(f"p{i}", Group.WRONG) for i in range(5)]
    redis_store.commit("r", CONFIG, ScoredBatch([append(key, 0, vectors(2)) for key in keys]))
    calls: list[int] = []
    scripts = redis_store._scripts
    monkeypatch.setattr(
        redis_store, "_scripts", lambda script, batch: calls.append(len(batch)) or scripts(script, batch)
    )
    monkeypatch.setattr("meds_service.storage.redis._CHANGES_CHUNK", 2)
    changes = redis_store.load_changes("r", {key: KeyHead(0, 1, 0, 0) for key in [*keys, A]}, CONFIG.stored_dim)
    assert calls == [6 if redis_store.cluster else 3]
    assert all(changes[key].first == 1 and changes[key].vectors.shape == (1, CONFIG.stored_dim) for key in keys)
    assert (changes[A].start, changes[A].n, changes[A].first, len(changes[A].vectors), changes[A].fit) == (
        0,
        0,
        1,
        0,
        None,
    )
    loaded = redis_store.load_keys("r", None, CONFIG.stored_dim)  # a fit unlike the view's is read with its labels
    assert sorted(loaded) == keys and all(
        len(state.vectors) == 2 and state.fitted_upto == 0 for state in loaded.values()
    )


def test_two_prompts_sharing_a_hash_are_refused_when_read(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_store.commit("r", CONFIG, ScoredBatch([append(A, 0, vectors(2))]))
    named = redis_store._prompt_key
    monkeypatch.setattr(redis_store, "_prompt_key", lambda run, prompt, what: named(run, "prompt-a", what))
    with pytest.raises(IdCollision, match="share a hash"):
        redis_store.load_changes("r", {MemoryKey("prompt-z", Group.WRONG): KeyHead()}, CONFIG.stored_dim)


def test_rows_past_the_scripts_budget_are_read_apart(redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script returns rows up to a budget (it holds Redis while it runs); the rest come by plain commands,
    and what is read is the same."""
    keys = [MemoryKey(f"p{i}", Group.WRONG) for i in range(4)]
    redis_store.commit("r", CONFIG, ScoredBatch([append(key, 0, vectors(3)) for key in keys]))
    since = {key: KeyHead(0, 1, 0, 0) for key in keys}
    whole = redis_store.load_changes("r", since, CONFIG.stored_dim)
    monkeypatch.setattr("meds_service.storage.redis._CHANGES_BUDGET", 2 * 4 * CONFIG.stored_dim + 1)  # one key's
    parted = redis_store.load_changes("r", since, CONFIG.stored_dim)
    assert all(len(whole[key].vectors) == 2 for key in keys)
    assert all(np.array_equal(whole[key].vectors, parted[key].vectors) for key in keys)
    assert [(d.start, d.n, d.first) for d in whole.values()] == [(d.start, d.n, d.first) for d in parted.values()]
