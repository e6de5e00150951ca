"""Test-only look at the Redis refit queue (the service never needs its length)."""

from __future__ import annotations

from meds_service.storage.redis import STREAM, RedisStore


def queue_length(store: RedisStore) -> int:
    """Refit jobs not yet acknowledged (delivered or not), through the store's own client (cluster-aware)."""
    groups = store._r.xinfo_groups(STREAM)
    return int(sum((g.get("lag") or 0) + (g.get("pending") or 0) for g in groups))
