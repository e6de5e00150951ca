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
