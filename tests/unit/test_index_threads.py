"""FAISS searches use the configured OpenMP thread count in the thread that searches, and FAISS's BLAS form.

OpenMP keeps the thread count per thread: setting it once at start-up (in the main thread) left the API's
worker threads with one OpenMP thread per core, which spin when the cores are busy (10-40x the CPU per step).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import faiss  # type: ignore[import-untyped]
import numpy as np
import pytest

from meds_service.storage import index as search_index
from meds_service.storage.index import ShardIndex, set_split_threads, set_threads, split_spans


@pytest.fixture(autouse=True)
def _restore_threads():
    split = search_index._split_threads[0]
    yield
    set_threads(1)
    search_index._split_threads[0] = split


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


# A step's searches in a process whose glibc keeps its default mmap threshold (128 KiB; a process's history
# can raise it, which is what made the defect come and go): page faults of one search_many over 512 keys.
# Whether the call's two result tables (8,192 x 6 ids and scores, 144 pages) reuse freed heap or take fresh
# pages also depends on the process's history: a CI run once counted 97 faults, the id table's pages, where
# other runs counted none. malloc_trim hands every free page back first, so the tables always take fresh
# pages and the count is the same on every run (about 157 here, against about 3,200 with FAISS's blocks).
_FAULTS = """
import ctypes, resource, sys
import numpy as np
import meds_service.storage.index as search
from meds_service.storage.index import ShardIndex
rng = np.random.default_rng(0)
index = ShardIndex(14, "cpu")
for key in range(512):
    index.append(key, rng.standard_normal((320, 14)).astype(np.float32))
queries = rng.standard_normal((512 * 16, 14)).astype(np.float32)
spans = [(key, 0, 320, 16 * key, 16 * key + 16) for key in range(512)]
first = index.search_many(spans, queries, 6)
if len(sys.argv) > 1:  # FAISS's default block sizes, as before the fix
    search.QUERY_BLOCK, search.DATABASE_BLOCK = 4096, 1024
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = index.search_many(spans, queries, 6)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
assert np.array_equal(first[1], again[1]) and np.array_equal(first[0], again[0])
print(faults)
"""


def _faults(*args: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", _FAULTS, *args], capture_output=True, text=True, env=env, check=True)
    return int(run.stdout.split()[-1])


def test_a_search_allocates_no_fresh_pages_per_key() -> None:
    """FAISS's default blocks need a 16 MiB buffer per call, which glibc maps and unmaps every time: a fresh
    mapping per key searched, ~6 page faults each, and a step's searches twice as long. The service's blocks
    keep the buffer on the heap, with the same results: the faults left are the result tables' (see _FAULTS)."""
    assert _faults("faiss-defaults") > 2048  # the defect, reproduced: several faults per key searched
    assert _faults() < 256  # the tables' 144 pages and a few more, under one fault per two keys


def _spans(rows: list[int], queries: int) -> list[tuple[int, int, int, int, int]]:
    return [(key, 0, n, queries * key, queries * key + queries) for key, n in enumerate(rows)]


def test_small_searches_stay_in_one_thread_and_large_ones_are_dealt_out_evenly() -> None:
    """Dealt over 2 threads, a step's searches at 20 epochs of memory (213 rows a key, dim 14) took 4% longer,
    at 50 epochs (537 rows) 10% less (storage/index.py, SPLIT_MIN_WORK)."""
    twenty, fifty = _spans([213] * 512, 11), _spans([537] * 512, 11)
    assert split_spans(twenty, 14, 2) == [twenty]
    assert len(split_spans(twenty, 512, 2)) == 2  # the same shapes at a larger dim are worth dealing out
    assert split_spans(fifty, 14, 1) == [fifty]
    uneven = _spans([300 + 7 * key for key in range(200)], 16)
    for threads in (2, 3):
        parts = split_spans(uneven, 14, threads)
        assert len(parts) == threads and [span for part in parts for span in part] == uneven
        work = [sum((hi - lo) * (q_hi - q_lo) for _, lo, hi, q_lo, q_hi in part) for part in parts]
        assert max(work) < 1.05 * min(work)


def test_split_thread_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        set_split_threads(0)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_search_dealt_over_threads_finds_what_one_thread_finds(threads: int) -> None:
    """The same searches, bit for bit, whichever thread ran each key; every searching thread, the helpers
    included, runs FAISS with the configured OpenMP thread count."""
    set_threads(threads)
    rng = np.random.default_rng(3)
    index = ShardIndex(14, "cpu")
    sizes = [400 + 10 * key for key in range(64)]
    for key, n in enumerate(sizes):
        rows = rng.standard_normal((n, 14)).astype(np.float32)
        index.append(key, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    spans = _spans(sizes, 12)
    queries = rng.standard_normal((12 * len(sizes), 14)).astype(np.float32)
    search_index._split_threads[0] = 1
    alone = index.search_many(spans, queries, 4)
    search_index._split_threads[0] = 2
    searched_in: set[int] = set()
    scan = ShardIndex._scan

    def recorded(self: ShardIndex, *args: object) -> None:
        searched_in.add(threading.get_ident())
        scan(self, *args)  # type: ignore[arg-type]

    ShardIndex._scan = recorded  # type: ignore[method-assign]
    try:
        dealt = index.search_many(spans, queries, 4)
    finally:
        ShardIndex._scan = scan  # type: ignore[method-assign]
    assert len(searched_in) == 2 and threading.get_ident() in searched_in
    assert np.array_equal(alone[1], dealt[1]) and np.array_equal(alone[0], dealt[0])
    assert search_index._helper_pool(1).submit(faiss.omp_get_max_threads).result() == threads
