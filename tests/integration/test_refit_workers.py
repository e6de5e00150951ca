"""Refit worker processes run BLAS on one thread: the pool already holds a process per core."""

from __future__ import annotations

from pathlib import Path

from threadpoolctl import threadpool_info

from meds_service.storage.sqlite import SQLiteStore
from meds_service.workers import LocalRefitter


def test_worker_processes_use_one_blas_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "data")
    refitter = LocalRefitter(store.spec(), 2, processes=True)
    try:
        refitter.warm_up()
        libraries = refitter._pool.submit(threadpool_info).result(timeout=120)
    finally:
        refitter.close()
        store.close()
    blas = [lib for lib in libraries if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)
