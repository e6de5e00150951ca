"""Redis key layout: one prompt's data shares a Redis Cluster hash slot."""

from __future__ import annotations

from redis.cluster import key_slot

from meds_service.core.types import Group, MemoryKey
from meds_service.storage.redis import RedisStore


def test_a_prompts_keys_share_one_slot() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")  # never connected: names only
    for prompt in ("p", "a{b}c", "}{", "x" * 512, "ünïcode/prompt"):
        names = [store._meta("run", MemoryKey(prompt, g)) for g in Group]
        names += [store._vec("run", MemoryKey(prompt, g)) for g in Group]
        names += [store._prompt_key("run", prompt, what) for what in ("ids", "lock")]
        assert len({key_slot(n.encode()) for n in names}) == 1, prompt
    run_names = [store._run_key("run", what) for what in ("run", "keys", "pending")]
    assert len({key_slot(n.encode()) for n in run_names}) == 1
