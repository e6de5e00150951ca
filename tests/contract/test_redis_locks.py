"""Per-prompt locks on Redis and Redis Cluster: they exclude other processes, live on short leases that a
live owner renews, and fence the commit: a batch whose lease lapsed is refused, never applied twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from meds_service.core.errors import StoreUnavailable
from meds_service.core.types import Group, MemoryKey, ScoredBatch
from meds_service.settings import Settings
from meds_service.storage import open_store
from meds_service.storage.redis import RedisStore
from tests.contract.test_store_contract import CONFIG, append, vectors

pytestmark = pytest.mark.redis

A = MemoryKey("prompt-a", Group.WRONG)
B = MemoryKey("prompt-b", Group.CORRECT)


@pytest.fixture
def stores(redis_target: tuple[str, bool]) -> Iterator[tuple[RedisStore, RedisStore]]:
    """Two owners (as two replicas would be), with short leases."""
    url, cluster = redis_target
    first, second = (RedisStore(url, cluster=cluster, lock_wait_s=0.3, lock_lease_s=1.0) for _ in range(2))
    yield first, second
    first.close()
    second.close()


def lock_name(store: RedisStore, prompt: str) -> str:
    return store._prompt_key("r", prompt, "lock")


def test_locks_exclude_other_processes(stores: tuple[RedisStore, RedisStore]) -> None:
    first, second = stores
    with first.locked("r", ["p1", "p2"]):
        with pytest.raises(StoreUnavailable, match="another replica"), second.locked("r", ["p2", "p3"]):
            pass
        with second.locked("r", ["p3"]):  # other prompts are free
            pass
    with second.locked("r", ["p2"]):
        pass


def test_each_acquisition_has_its_own_token(stores: tuple[RedisStore, RedisStore]) -> None:
    first, _ = stores
    tokens = []
    for _ in range(2):
        with first.locked("r", ["p1"]):
            tokens.append(first._r.get(lock_name(first, "p1")))
    assert tokens[0] and tokens[1] and tokens[0] != tokens[1]
    assert first._r.get(lock_name(first, "p1")) is None  # released


def test_a_leftover_lock_expires_within_its_lease(redis_target: tuple[str, bool]) -> None:
    """A release that an outage prevented leaves the lock behind, even for its own process: it expires."""
    url, cluster = redis_target
    store = RedisStore(url, cluster=cluster, lock_wait_s=10, lock_lease_s=0.5)
    try:
        assert store._acquire([lock_name(store, "p9")], "an-earlier-acquisition")
        assert 0 < store._r.pttl(lock_name(store, "p9")) <= 500
        with store.locked("r", ["p9"]):
            assert store._r.get(lock_name(store, "p9")) != b"an-earlier-acquisition"
    finally:
        store.close()


def scripts_run(store: RedisStore) -> int:
    """How many scripts the (single) Redis ran since its statistics were last reset."""
    stats = store._r.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))


def test_a_batch_takes_renews_and_releases_its_locks_in_one_script_each(redis_url: str) -> None:
    """On a single Redis a batch's locks are one round trip each way, however many prompts it has (they
    were one script per prompt: 1,024 a step of 512 prompts)."""
    # A long lease: the background renewal (every third of a lease) must not add a script of its own while
    # the test counts them (it did once on a busy machine, at the default 3 s).
    first, second = (RedisStore(redis_url, lock_wait_s=0.3, lock_lease_s=60.0) for _ in range(2))
    prompts = [f"p{i}" for i in range(64)]
    try:
        # A script the server has not cached yet costs two calls the first time (EVALSHA answered NOSCRIPT, then
        # again once loaded): whether an earlier test on the same Redis ran it decided the count, so load them.
        for script in (first._lock, first._renew, first._unlock):
            first._r.script_load(script.script)
        first._r.config_resetstat()
        with first.locked("r", prompts):
            assert scripts_run(first) == 1
            assert all(first._r.get(lock_name(first, p)) for p in prompts)
            assert first._renew_locks(sorted(lock_name(first, p) for p in prompts), first._held.token("r")) == 64
            assert scripts_run(first) == 2
            with pytest.raises(StoreUnavailable, match="another replica"), second.locked("r", ["q", prompts[-1]]):
                pass
            assert first._r.get(lock_name(first, "q")) is None  # all or none: the free prompt was not taken
        assert not any(first._r.get(lock_name(first, p)) for p in prompts)
    finally:
        first.close()
        second.close()


def test_a_live_owner_keeps_its_locks_past_many_leases(stores: tuple[RedisStore, RedisStore]) -> None:
    first, second = stores
    with first.locked("r", [A.prompt_id, B.prompt_id]):
        time.sleep(3.5)  # three and a half leases: held only because they are renewed
        with pytest.raises(StoreUnavailable, match="another replica"), second.locked("r", [A.prompt_id]):
            pass
        first.commit("r", CONFIG, ScoredBatch([append(A, 0, vectors(2)), append(B, 0, vectors(1))]))
    assert first.counts("r").rollouts == 3


def stall_renewals(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The owner stalls (a long GC pause, a partition): its renewals hang until the returned event is set."""
    resume = threading.Event()

    def stalled(names: list[str], token: str) -> int:
        resume.wait(30)
        return 0

    monkeypatch.setattr(store, "_renew_locks", stalled)
    return resume


def test_a_commit_after_the_lease_lapsed_is_refused(
    stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late owner's keys did not move (the n check alone would let it through): the fence refuses it,
    and the lock's new owner stores the batch, once."""
    first, second = stores
    resume = stall_renewals(first, monkeypatch)
    batch = ScoredBatch([append(A, 0, vectors(2)), append(B, 0, vectors(1))], [], [])
    try:
        with first.locked("r", [A.prompt_id, B.prompt_id]):
            second.lock_wait_s = 10
            with second.locked("r", [B.prompt_id, A.prompt_id]):  # taken once the first's lease lapsed
                with pytest.raises(StoreUnavailable, match="lease expired"):
                    first.commit("r", CONFIG, batch)
                second.commit("r", CONFIG, batch)
            with pytest.raises(StoreUnavailable, match="lease expired"):  # the lock is free now: still refused
                first.commit("r", CONFIG, batch)
    finally:
        resume.set()
    counts = first.counts("r")
    assert (counts.keys, counts.vectors, counts.rollouts) == (2, 3, 3)
    heads = first.heads("r", [A, B])
    assert (heads[A].n, heads[B].n) == (2, 1)
    assert first.list_keys("r") == [A, B]


def test_a_lapsed_lease_on_one_prompt_keeps_the_batch_out(
    stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only prompt-b's lock was lost: a single Redis refuses the whole batch, a cluster only that prompt."""
    first, second = stores
    with first.locked("r", [A.prompt_id, B.prompt_id]):
        first._r.delete(lock_name(first, B.prompt_id))  # as if its lease had lapsed
        with second.locked("r", [B.prompt_id]), pytest.raises(StoreUnavailable, match="lease expired"):
            first.commit("r", CONFIG, ScoredBatch([append(A, 0, vectors(2)), append(B, 0, vectors(1))]))
    counts = first.counts("r")
    if first.cluster:
        assert (counts.keys, counts.rollouts) == (1, 2) and first.list_keys("r") == [A]
    else:
        assert (counts.keys, counts.rollouts) == (0, 0) and first.list_keys("r") == []


def test_a_commit_outside_locked_is_not_fenced(stores: tuple[RedisStore, RedisStore]) -> None:
    """Single-writer tools and the contract suite commit without locks; another thread's lease is not theirs."""
    first, _ = stores
    with first.locked("r", ["other"]):
        worker = threading.Thread(target=first.commit, args=("r", CONFIG, ScoredBatch([append(A, 0, vectors(1))])))
        worker.start()
        worker.join(30)
    first.commit("r", CONFIG, ScoredBatch([append(A, 1, vectors(1))]))
    assert first.counts("r").rollouts == 2


def test_the_lease_and_wait_settings_reach_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDS_LOCK_LEASE_S", "1.5")
    monkeypatch.setenv("MEDS_LOCK_WAIT_S", "4")
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    store = open_store(settings.store_spec(), settings.store_options())  # never connected: options only
    assert isinstance(store, RedisStore) and (store.lock_lease_ms, store.lock_wait_s) == (1500, 4.0)
    assert Settings().lock_lease_s == 1.5
    monkeypatch.setenv("MEDS_LOCK_LEASE_S", "0")
    with pytest.raises(ValidationError, match="lock_lease_s"):
        Settings()
