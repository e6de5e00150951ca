"""Per-prompt locks on Redis and Redis Cluster: they exclude other processes, never this one's own leftovers."""

from __future__ import annotations

import pytest

from meds_service.core.errors import StoreUnavailable
from meds_service.storage.redis import RedisStore

pytestmark = pytest.mark.redis


def test_locks_exclude_other_processes_and_not_this_one(redis_target: tuple[str, bool]) -> None:
    url, cluster = redis_target
    first, second = (RedisStore(url, cluster=cluster, lock_wait_s=0.3) for _ in range(2))
    with first.locked("r", ["p1", "p2"]):
        with pytest.raises(StoreUnavailable, match="another replica"), second.locked("r", ["p2", "p3"]):
            pass
        with second.locked("r", ["p3"]):  # other prompts are free
            pass
    with second.locked("r", ["p2"]):
        pass
    first._acquire([first._prompt_key("r", "p9", "lock")], first._token)  # a release an outage prevented
    with first.locked("r", ["p9"]):  # the same process takes its own leftover lock back
        pass
    first.close()
    second.close()
