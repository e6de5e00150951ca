"""Storage adapters: the durable record (SQLite, Redis), the kNN index (FAISS) and index snapshots.

`open_store` is the one place a `StoreSpec` becomes a store: to add a backend, write its adapter (it must
pass tests/contract) and add one entry to `BACKENDS` (docs/architecture.md, "Where to add things").
"""

from __future__ import annotations

from collections.abc import Callable

from ..core.records import StoreSpec
from .redis import RedisStore
from .sqlite import SQLiteStore

Store = SQLiteStore | RedisStore
Opener = Callable[[StoreSpec, bool, dict[str, float]], Store]


def _sqlite(spec: StoreSpec, read_only: bool, options: dict[str, float]) -> Store:
    return SQLiteStore(spec.location, read_only=read_only)


def _redis(spec: StoreSpec, read_only: bool, options: dict[str, float]) -> Store:
    return RedisStore(spec.location, cluster=spec.backend == "redis-cluster", **options)


BACKENDS: dict[str, Opener] = {"sqlite": _sqlite, "redis": _redis, "redis-cluster": _redis}


def open_store(spec: StoreSpec, options: dict[str, float] | None = None, *, read_only: bool = False) -> Store:
    """Open the store a spec describes; `options` are the backend's keyword options (Redis timeouts)."""
    opener = BACKENDS.get(spec.backend)
    if opener is None:
        raise ValueError(f"unknown store backend {spec.backend!r} (known: {', '.join(sorted(BACKENDS))})")
    return opener(spec, read_only, options or {})
