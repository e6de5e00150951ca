"""The index search's settings side by side in one run (A/B), at several dimensions.

The service sets FAISS's `distance_compute_blas_threshold` to 0 (every search is one BLAS matrix product
per key) and one OpenMP thread per searching thread, and deals a large batch of keys over 2 threads
(storage/index.py). This times those against the same searches in one thread, against FAISS's own default
threshold (below it FAISS scans one query-row pair at a time) and against 2 OpenMP threads, on two shapes:
the engine's `search_many` (512 keys x 16 queries against 320 rows each, k + 1 = 4 neighbours, one call) and
bench_gpu's per-key `search` calls (the same searches, one call per key, never dealt out).

Rounds interleave the variants (forward, then reversed) and each variant reports the minimum and median
wall time and the median CPU time of the process (idle OpenMP workers that spin show there). Every variant
must return the same neighbours as the service's setting up to the float32 rounding bound of core/knn.py
(scores within twice the bound); the run fails otherwise. Results: bench/results/search.json.

    .venv/bin/python -m bench.bench_search                        # dims 14, 512, 4096
    .venv/bin/python -m bench.bench_search --dims 14,64 --rounds 3
    .venv/bin/python -m bench.bench_search --quick                # 32 keys, dims 14 and 64, one round
    .venv/bin/python -m bench.bench_search --busy 2 --dims 14,512  # with 2 processes spinning on the cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.machine import BUSY_LOAD, busy_cores, describe, load_average, warn_busy
from meds_service.core import knn
from meds_service.storage import index as index_module
from meds_service.storage.index import ShardIndex, set_split_threads, set_threads

RESULTS = Path(__file__).resolve().parent / "results"
FAISS_DEFAULT_THRESHOLD = int(faiss.cvar.distance_compute_blas_threshold)  # read before any search sets it
QUERIES, ROWS, NEIGHBOURS = 16, 320, 4


@dataclass(frozen=True)
class Variant:
    name: str
    blas_threshold: int
    threads: int  # OpenMP threads per searching thread
    split: int = 1  # threads a large search_many is dealt over (storage/index.py, set_split_threads)


VARIANTS = [
    Variant("service: BLAS, 1 thread, dealt over 2", 0, 1, 2),
    Variant("BLAS, 1 thread, not dealt out", 0, 1),
    Variant("FAISS default threshold, 1 thread", FAISS_DEFAULT_THRESHOLD, 1),
    Variant("BLAS, 2 threads", 0, 2),
    Variant("FAISS default threshold, 2 threads", FAISS_DEFAULT_THRESHOLD, 2),
]

Result = tuple[np.ndarray, np.ndarray]


@contextmanager
def applied(variant: Variant) -> Iterator[None]:
    """Searches run with the variant's settings: the index applies its module's threshold at every search."""
    saved, split = index_module._BLAS_THRESHOLD, index_module._split_threads[0]
    index_module._BLAS_THRESHOLD = variant.blas_threshold
    set_threads(variant.threads)
    set_split_threads(variant.split)
    try:
        yield
    finally:
        index_module._BLAS_THRESHOLD = saved
        set_threads(1)
        set_split_threads(split)


def workload(dim: int, keys: int) -> tuple[ShardIndex, np.ndarray, list[tuple[int, int, int, int, int]]]:
    """Shards of ROWS unit vectors and QUERIES unit queries per key, as the engine lays them out."""
    rng = np.random.default_rng(dim)
    index = ShardIndex(dim, "cpu")
    for key in range(keys):
        rows = rng.standard_normal((ROWS, dim)).astype(np.float32)
        index.append(key, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    queries = rng.standard_normal((keys * QUERIES, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    spans = [(key, 0, ROWS, key * QUERIES, (key + 1) * QUERIES) for key in range(keys)]
    return index, queries, spans


def shapes(index: ShardIndex, queries: np.ndarray, spans: list[Any]) -> dict[str, Callable[[], Result]]:
    def engine() -> Result:
        return index.search_many(spans, queries, NEIGHBOURS)

    def per_key() -> Result:
        found = [index.search(key, lo, hi, queries[q_lo:q_hi], NEIGHBOURS) for key, lo, hi, q_lo, q_hi in spans]
        return np.concatenate([s for s, _ in found]), np.concatenate([i for _, i in found])

    return {"search_many (engine)": engine, "search per key (bench_gpu)": per_key}


def compare(dim: int, keys: int, rounds: int) -> list[dict[str, Any]]:
    index, queries, spans = workload(dim, keys)
    runs = shapes(index, queries, spans)
    wall: dict[tuple[str, str], list[float]] = {(v.name, s): [] for v in VARIANTS for s in runs}
    cpu: dict[tuple[str, str], list[float]] = {(v.name, s): [] for v in VARIANTS for s in runs}
    results: dict[tuple[str, str], Result] = {}
    load_before = load_average()
    for round_ in range(rounds + 1):  # round 0 warms up and is not counted
        for variant in VARIANTS if round_ % 2 else VARIANTS[::-1]:
            with applied(variant):
                for shape, run in runs.items():
                    cpu_start, started = time.process_time(), time.perf_counter()
                    results[variant.name, shape] = run()
                    if round_:
                        wall[variant.name, shape].append(time.perf_counter() - started)
                        cpu[variant.name, shape].append(time.process_time() - cpu_start)
    load_after = load_average()
    bound = knn.float32_bound(dim)
    reference = results[VARIANTS[0].name, next(iter(runs))]
    rows = []
    for name, shape in wall:
        scores, ids = results[name, shape]
        score_gap = float(np.max(np.abs(scores.astype(np.float64) - reference[0])))
        if score_gap > 2 * bound:
            raise SystemExit(f"dim {dim}, {name}, {shape}: scores differ by {score_gap:.2e} > 2 x bound")
        rows.append({
            "dim": dim, "variant": name, "shape": shape,
            "wall_min_ms": 1e3 * min(wall[name, shape]), "wall_median_ms": 1e3 * statistics.median(wall[name, shape]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[name, shape]),
            "ids_identical_fraction": float(np.mean(np.all(ids == reference[1], axis=1))),
            "max_score_gap": score_gap, "twice_float32_bound": 2 * bound,
            "load_before": load_before, "load_after": load_after,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="14,512,4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where search.json goes")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the cores meanwhile (contention)")
    args = parser.parse_args(argv)
    keys = 32 if args.quick else 512
    dims, rounds = ("14,64", 1) if args.quick else (args.dims, args.rounds)
    summary: dict[str, Any] = {
        "machine_before": describe(),
        "faiss": faiss.__version__,
        "faiss_default_blas_threshold": FAISS_DEFAULT_THRESHOLD,
        "shape": {"keys": keys, "queries_per_key": QUERIES, "rows_per_key": ROWS, "neighbours": NEIGHBOURS},
        "rounds": rounds,
        "busy_processes": args.busy,
        "rows": [],
    }
    print(f"FAISS {faiss.__version__}, default distance_compute_blas_threshold {FAISS_DEFAULT_THRESHOLD}")
    print(f"{'dim':>5} {'shape':<27} {'variant':<35} {'min ms':>8} {'median':>8} {'cpu ms':>8} {'x service':>9}")
    for dim in (int(d) for d in dims.split(",") if d):
        with busy_cores(args.busy):
            rows = compare(dim, keys, rounds)
        service = {r["shape"]: r["wall_median_ms"] for r in rows if r["variant"] == VARIANTS[0].name}
        for r in rows:
            r["median_over_service"] = r["wall_median_ms"] / service[r["shape"]]
            print(f"{dim:>5} {r['shape']:<27} {r['variant']:<35} {r['wall_min_ms']:>8.1f} {r['wall_median_ms']:>8.1f} "
                  f"{r['cpu_median_ms']:>8.1f} {r['median_over_service']:>8.2f}x")  # fmt: skip
        print(f"      load {rows[0]['load_before'][0]:.2f} -> {rows[0]['load_after'][0]:.2f}", flush=True)
        summary["rows"] += rows
    summary["machine_after"] = describe()
    loads = [r["load_before"][0] for r in summary["rows"]] + [r["load_after"][0] for r in summary["rows"]]
    if loads and max(loads) > BUSY_LOAD:
        warn_busy((max(loads), 0.0, 0.0))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"search_busy{args.busy}.json" if args.busy else "search.json"
    (args.out / name).write_text(json.dumps(summary, indent=2))
    print(f"Results in {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
