"""Every store implementation, behind one fixture: the contract suite runs against each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meds_service.engine.ports import MemoryStore
from meds_service.storage.redis import RedisStore
from meds_service.storage.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "data")
        yield sqlite
        sqlite.close()
    else:
        cluster = request.param == "redis-cluster"
        url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
        redis_store = RedisStore(url, cluster=cluster)
        yield redis_store
        redis_store.close()


@pytest.fixture
def redis_store(redis_target: tuple[str, bool]) -> Iterator[RedisStore]:
    """A RedisStore on a clean single Redis, then on a clean 3-master Redis Cluster."""
    url, cluster = redis_target
    store = RedisStore(url, cluster=cluster)
    yield store
    store.close()
