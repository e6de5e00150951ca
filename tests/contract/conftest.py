"""Every store implementation, behind one fixture: the contract suite runs against each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meds_service.engine.ports import MemoryStore
from meds_service.storage.redis import RedisStore
from meds_service.storage.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "data")
        yield sqlite
        sqlite.close()
    else:
        redis_store = RedisStore(request.getfixturevalue("redis_url"))
        yield redis_store
        redis_store.close()
