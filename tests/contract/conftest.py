"""Every implementation of every port, behind one fixture per port: each contract suite runs against all.

store          MemoryStore    SQLite, Redis, Redis Cluster
coordination   Coordination   LocalCoordination (over SQLite), SharedCoordination (over Redis)
queue          RefitQueue     Redis, Redis Cluster
indexes        VectorIndexes  FAISS shards (CPU, and the GPU when one is visible)
snapshots      SnapshotStore  local folder
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meds_service.engine import ErrorMemory
from meds_service.engine.coordination import Coordination, coordination_for
from meds_service.engine.ports import MemoryStore, SnapshotStore, VectorIndexes
from meds_service.storage.index import ShardIndexes, gpu_count
from meds_service.storage.redis import RedisStore
from meds_service.storage.snapshot import SnapshotFolder
from meds_service.storage.sqlite import SQLiteStore
from meds_service.workers import LocalRefitter
from tests.unit.test_engine import Recorder


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
def engine(store: MemoryStore) -> Iterator[ErrorMemory]:
    refitter = LocalRefitter(store.spec(), 2, processes=False)
    memory = ErrorMemory(store, refitter, observer=Recorder(), indexes=ShardIndexes())
    memory.load()
    yield memory
    refitter.close()


@pytest.fixture
def coordination(store: MemoryStore) -> Coordination:
    return coordination_for(store, ShardIndexes("cpu"))


@pytest.fixture
def queue(redis_target: tuple[str, bool]) -> Iterator[RedisStore]:
    """A RefitQueue that is also the store its jobs refer to: on a single Redis, then on a Redis Cluster."""
    url, cluster = redis_target
    redis_store = RedisStore(url, cluster=cluster)
    redis_store.ensure_queue()
    yield redis_store
    redis_store.close()


@pytest.fixture(params=["cpu", "cuda"])
def indexes(request: pytest.FixtureRequest) -> VectorIndexes:
    if request.param == "cuda" and gpu_count() == 0:
        return ShardIndexes("cpu")  # the GPU path falls back to the CPU, and must keep the contract there
    return ShardIndexes(request.param)


@pytest.fixture
def snapshots(tmp_path: Path) -> SnapshotStore:
    return SnapshotFolder(tmp_path / "snapshots")


@pytest.fixture
def redis_store(redis_target: tuple[str, bool]) -> Iterator[RedisStore]:
    """A RedisStore on a clean single Redis, then on a clean 3-master Redis Cluster."""
    url, cluster = redis_target
    store = RedisStore(url, cluster=cluster)
    yield store
    store.close()
