"""FAISS searches use the configured OpenMP thread count in the thread that searches, and FAISS's BLAS form.

OpenMP keeps the thread count per thread: setting it once at start-up (in the main thread) left the API's
worker threads with one OpenMP thread per core, which spin when the cores are busy (10-40x the CPU per step).
"""

from __future__ import annotations

import threading

import faiss  # type: ignore[import-untyped]
import numpy as np
import pytest

from meds_service.storage.index import ShardIndex, set_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    set_threads(1)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_search_in_a_new_thread_runs_with_the_configured_threads(threads: int) -> None:
    set_threads(threads)
    rng = np.random.default_rng(0)
    index = ShardIndex(8, "cpu")
    rows = rng.normal(size=(40, 8)).astype(np.float32)
    index.append("key", rows / np.linalg.norm(rows, axis=1, keepdims=True))
    seen: list[int] = []

    def search() -> None:
        index.search("key", 0, 40, rows[:5], 4)
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search)
    worker.start()
    worker.join()
    assert seen == [threads]


def test_thread_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        set_threads(0)


def test_a_search_takes_the_blas_form_whatever_faiss_defaults_to() -> None:
    """The BLAS form is 1.3-2.6x faster than FAISS's pair scan on a key's searches (bench/bench_search.py),
    which FAISS's own threshold would pick for 16 queries at up to 8,000 dims."""
    faiss.cvar.distance_compute_blas_threshold = 128_000
    index = ShardIndex(8, "cpu")
    rows = np.eye(8, dtype=np.float32)
    index.append("key", rows)
    index.search_many([("key", 0, 8, 0, 2)], rows[:2], 3)
    assert faiss.cvar.distance_compute_blas_threshold == 0
