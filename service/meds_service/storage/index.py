"""The kNN index: per-key shards of L2-normalised float32 vectors, searched by inner product with FAISS.

Inner product on unit vectors is cosine similarity. Each memory key is its own shard (one contiguous array),
because a query only ever looks at its own key's vectors: a global index would scan every key. A GPU is used
when FAISS was built with CUDA support and one is visible (`MEDS_INDEX_DEVICE=auto|cuda`), otherwise the
CPU; results carry a rounding bound that the engine uses to prove the neighbour sets exact (see core/knn.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss  # type: ignore[import-untyped]
import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

_search_threads = [1]  # set once at start-up by set_threads; read by every searching thread

_Span = tuple[Hashable, int, int, int, int]  # key, its rows lo..hi, the queries q_lo..q_hi that search them


def set_threads(threads: int) -> None:
    """OpenMP threads FAISS may use for a search. Per-key searches are tiny: one thread avoids the
    spin-waiting of idle OpenMP workers, which costs far more than it saves on a small host.

    OpenMP keeps this setting per thread, and searches run in the API's worker threads, not in the thread
    that starts the service: every search applies it in its own thread (`_use_search_threads`).
    """
    if threads < 1:
        raise ValueError("threads must be >= 1")
    _search_threads[0] = threads
    faiss.omp_set_num_threads(threads)


# Below this threshold FAISS scans a search one query-row pair at a time (a dot product per pair), otherwise
# with a BLAS matrix product. FAISS before 1.14.2 counts queries (default 20), later versions queries x dims
# (default 128,000), so a key's 16 or so queries take the pair scan up to 8,000 dims; yet on a key's few
# hundred rows the BLAS form is faster at every dim measured, 1.3-2.6x at dims 14, 512 and 4,096
# (bench/bench_search.py), and 0 picks it on every version. Both are float32 dot products in some order of
# summation, which the engine's rounding bound (core/knn.py) covers whatever the order.
_BLAS_THRESHOLD = 0

# The BLAS form multiplies blocks of QUERY_BLOCK queries by DATABASE_BLOCK rows into a buffer it allocates on
# every call: 4096 x 1024 floats (16 MiB) by default. glibc serves blocks that large with mmap and munmap, per
# call, unless an earlier free in the process happened to raise its mmap threshold: a service whose memory
# grew step by step made ~500 mmap/munmap pairs a step, and its searches took 2x as long as those of one
# whose memory came in one large request. 16 x 1024 floats (64 KiB) stay under glibc's default threshold
# (128 KiB), whatever the process did before; a key's queries (16 or so) still make one block, and the
# results are the same products (tests/unit/test_index_threads.py).
QUERY_BLOCK = 16
DATABASE_BLOCK = 1024


def _use_search_threads() -> None:
    """Apply the configured OpenMP thread count in the calling thread (a new thread starts with every core),
    and the BLAS form of the scan with its block sizes (process-wide FAISS settings, the same for every search)."""
    if faiss.omp_get_max_threads() != _search_threads[0]:
        faiss.omp_set_num_threads(_search_threads[0])
    settings = faiss.cvar
    if settings.distance_compute_blas_threshold != _BLAS_THRESHOLD:
        settings.distance_compute_blas_threshold = _BLAS_THRESHOLD
    if settings.distance_compute_blas_query_bs != QUERY_BLOCK:
        settings.distance_compute_blas_query_bs = QUERY_BLOCK
    if settings.distance_compute_blas_database_bs != DATABASE_BLOCK:
        settings.distance_compute_blas_database_bs = DATABASE_BLOCK


# A request's per-key searches can be dealt over several threads: FAISS releases the GIL while it searches,
# so the parts run on as many cores, and each key's results go to its own rows of the tables. Every thread
# waits on a queue when it has nothing to do (OpenMP's idle workers spin instead: see set_threads). A part
# costs the GIL between searches (a Python step and a thread handoff per key), which small searches do not
# repay. On 2 cores at dim 14, a step's searches (512 keys x 11 queries) dealt over 2 threads took 2-4%
# longer at 213 rows a key (20 epochs of memory), and the engine's whole step took 8% less at 537 rows and 9%
# less at 1,103 (bench/bench_engine.py); 512 keys x 16 queries x 320 rows took 1.3x less time at dim 14 and
# 1.8x less at dims 512 and 4,096 (bench/bench_search.py). So a search is dealt out only when its keys' mean
# work is at least SPLIT_MIN_WORK, counted as rows x queries x (dim + SELECT_COST): the products, plus the
# top-k selection, which costs about as much per query-row pair as a product of SELECT_COST values.
SELECT_COST = 32
SPLIT_MIN_WORK = 4096 * (14 + SELECT_COST)
_split_threads = [min(2, os.cpu_count() or 1)]  # set at start-up by set_split_threads (MEDS_INDEX_SPLIT_THREADS)
_helpers: dict[int, ThreadPoolExecutor] = {}  # by size: the pool of search helper threads, made on first use
_helpers_lock = threading.Lock()


def set_split_threads(threads: int) -> None:
    """Threads a large `search_many` is dealt over (the calling thread and threads - 1 helpers); 1 keeps
    every search in the calling thread. More threads than the machine's cores are never useful: capped."""
    if threads < 1:
        raise ValueError("threads must be >= 1")
    _split_threads[0] = min(threads, os.cpu_count() or 1)


def _helper_pool(helpers: int) -> ThreadPoolExecutor:
    with _helpers_lock:
        pool = _helpers.get(helpers)
        if pool is None:
            pool = _helpers[helpers] = ThreadPoolExecutor(helpers, thread_name_prefix="meds-search")
        return pool


def split_spans(spans: Sequence[_Span], dim: int, threads: int) -> list[Sequence[_Span]]:
    """Spans in `threads` contiguous parts of about equal work, or one part when the search is too small
    to repay the handoffs (SPLIT_MIN_WORK)."""
    if threads < 2 or len(spans) < 2:
        return [spans]
    work = np.array([(hi - lo) * (q_hi - q_lo) for _, lo, hi, q_lo, q_hi in spans], dtype=np.float64)
    work *= dim + SELECT_COST
    if work.mean() < SPLIT_MIN_WORK:
        return [spans]
    total = np.cumsum(work)
    cuts = np.searchsorted(total, total[-1] * np.arange(1, threads) / threads, side="right")
    bounds = [0, *np.clip(cuts, 1, len(spans) - 1).tolist(), len(spans)]
    return [spans[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def gpu_count() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # a CPU-only FAISS build has no GPU API at all
        return 0


@dataclass
class _Shard:
    rows: NDArray[np.float32]  # capacity x dim; the first `count` rows are live
    count: int = 0


class ShardIndex:
    """Normalised vectors of one run, one growable shard per key; row 0 of a shard is the key's oldest live vector."""

    def __init__(self, dim: int, device: str = "auto") -> None:
        self.dim = dim
        self._shards: dict[Hashable, _Shard] = {}
        self._gpu_resources = None
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown index device {device!r}")
        if device != "cpu" and gpu_count() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
        elif device == "cuda":
            log.warning("MEDS_INDEX_DEVICE=cuda but FAISS sees no GPU; using the CPU")

    @property
    def device(self) -> str:
        return "cuda" if self._gpu_resources is not None else "cpu"

    @property
    def rounding_safety(self) -> float:
        """Factor on the float32 rounding bound: GPU GEMMs may sum in other orders and fused steps."""
        return 8.0 if self._gpu_resources is not None else 1.0

    def count(self, key: Hashable) -> int:
        shard = self._shards.get(key)
        return 0 if shard is None else shard.count

    def append(self, key: Hashable, vectors: NDArray[np.float32]) -> None:
        shard = self._shards.get(key)
        if shard is None:
            shard = self._shards[key] = _Shard(np.empty((max(16, len(vectors)), self.dim), np.float32))
        needed = shard.count + len(vectors)
        if needed > len(shard.rows):
            grown = np.empty((max(needed, 2 * len(shard.rows)), self.dim), np.float32)
            grown[: shard.count] = shard.rows[: shard.count]
            shard.rows = grown
        shard.rows[shard.count : needed] = vectors
        shard.count = needed

    def drop_front(self, key: Hashable, n: int) -> None:
        """Forget a key's n oldest vectors (a capped memory moved on)."""
        shard = self._shards[key]
        n = min(n, shard.count)
        shard.rows[: shard.count - n] = shard.rows[n : shard.count].copy()
        shard.count -= n

    def remove(self, key: Hashable) -> None:
        self._shards.pop(key, None)

    def rows(self, key: Hashable, lo: int, hi: int) -> NDArray[np.float32]:
        return self._shards[key].rows[lo:hi]

    def search(
        self, key: Hashable, lo: int, hi: int, queries: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The k most similar of a key's rows lo..hi for each query: (similarities descending, row - lo)."""
        base = self._shards[key].rows[lo:hi]
        k = min(k, len(base))
        if self._gpu_resources is not None:
            try:
                return faiss.knn_gpu(  # type: ignore[no-any-return]
                    self._gpu_resources, queries, base, k, metric=faiss.METRIC_INNER_PRODUCT
                )
            except RuntimeError:
                log.exception("GPU kNN failed; falling back to the CPU for this index")
                self._gpu_resources = None
        _use_search_threads()
        scores, ids = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, ids

    def search_many(
        self, spans: Sequence[_Span], queries: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Many keys' searches in one call: span (key, lo, hi, q_lo, q_hi) searches the key's rows lo..hi for
        queries[q_lo:q_hi]. Returns [len(queries), k] tables of similarities (descending) and row - lo; where
        a key has fewer than k rows, and in the rows of queries no span covers, scores are -inf and ids -1.

        Each key's results are written straight into its rows of the tables (no per-key arrays), and the
        thread settings are applied once per searching thread. On the CPU a large batch is dealt over
        `set_split_threads` threads (`split_spans`); the results are the same searches, whichever thread ran
        them.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if self._gpu_resources is not None:
            for key, lo, hi, q_lo, q_hi in spans:
                found, rows = self.search(key, lo, hi, queries[q_lo:q_hi], k)
                scores[q_lo:q_hi, : found.shape[1]] = found
                ids[q_lo:q_hi, : rows.shape[1]] = rows
            return scores, ids
        parts = split_spans(spans, self.dim, _split_threads[0])
        helped = [_helper_pool(len(parts) - 1).submit(self._scan, part, queries, k, scores, ids) for part in parts[1:]]
        try:
            self._scan(parts[0], queries, k, scores, ids)
        finally:
            for part in helped:  # never return (or raise) while a helper still writes into the tables
                part.result()
        scores[ids < 0] = -np.inf  # FAISS marks missing neighbours with the lowest float, not -inf
        return scores, ids

    def _scan(
        self,
        spans: Sequence[_Span],
        queries: NDArray[np.float32],
        k: int,
        scores: NDArray[np.float32],
        ids: NDArray[np.int64],
    ) -> None:
        """Search the spans one key after another in the calling thread, into their rows of the tables."""
        _use_search_threads()
        dim, knn, ptr, shards = self.dim, faiss.knn_inner_product, faiss.swig_ptr, self._shards
        for key, lo, hi, q_lo, q_hi in spans:
            base = shards[key].rows[lo:hi]
            # Rows q_lo..q_hi of a C-ordered table are one contiguous block: FAISS writes them in place.
            knn(
                ptr(queries[q_lo:q_hi]),
                ptr(base),
                dim,
                q_hi - q_lo,
                hi - lo,
                k,
                ptr(scores[q_lo:q_hi]),
                ptr(ids[q_lo:q_hi]),
            )


class ShardIndexes:
    """The engine's `VectorIndexes`: makes one `ShardIndex` per run, all on one device choice."""

    def __init__(self, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown index device {device!r}")
        self.device_choice = device

    @property
    def device(self) -> str:
        """The device new indexes use."""
        return "cuda" if self.device_choice != "cpu" and gpu_count() > 0 else "cpu"

    def new(self, dim: int) -> ShardIndex:
        return ShardIndex(dim, self.device_choice)
