"""Every store implementation, behind one fixture: the contract suite runs against each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meds_service.engine.ports import MemoryStore
from meds_service.storage.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    backend = request.param
    if backend == "sqlite":
        s = SQLiteStore(tmp_path / "data")
        yield s
        s.close()
