"""Refit throughput, A/B in one run: the serial reference against the service's fit, at 20 and 100 epochs.

Keys are grown as bench/bench_curves.py grows them (64 prompts x 16 rollouts per epoch, dim 14, both groups
of every prompt: 128 keys), without a server: this isolates the fit from the store and the HTTP path, which
`bench_curves` measures end to end. Sides, interleaved in every repetition (medians of `--repeats`):

- reference: `hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(normalize(X))`, serially;
- tree query: `core.clustering.fit_labels` with the KD-tree answering the core-distance query (the previous
  release), serially and in `--processes` worker processes;
- service: `fit_labels` as it is, serially and in `--processes` worker processes (the refit pool's workers:
  `workers._init_worker`, keys dealt by size as `engine.refits.split_keys` deals them).

Every side's labels are compared with the reference's on every key. Each figure carries its load average and
CPU seconds; a busy machine is flagged (bench/machine.py). Results: bench/results/refits.json and .csv.

    python -m bench.bench_refits                   # 20 and 100 epochs, 2 processes (about 2 minutes idle)
    python -m bench.bench_refits --epochs 100 --repeats 5
    python -m bench.bench_refits --quick           # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import hdbscan
import numpy as np
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

from bench.machine import describe, measured
from bench.output import write_csv
from bench.workload import Workload
from meds_service.core import clustering
from meds_service.core.config import RunConfig
from meds_service.engine.refits import split_keys
from meds_service.workers import _init_worker, _warm

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = RunConfig()


def grow(prompts: int, epochs: list[int], seed: int) -> dict[int, list[np.ndarray]]:
    """Every key's stored vectors after each epoch in `epochs` (a key: one prompt's right or wrong group)."""
    wl = Workload(prompts=prompts, rollouts=16, dim=14, seed=seed)
    history: dict[tuple[str, bool], list[np.ndarray]] = {}
    grown = {}
    for epoch in range(1, max(epochs) + 1):
        step = wl.step()
        for prompt, correct, fp in zip(step["prompt_ids"], step["correct"], step["fingerprints"], strict=True):
            history.setdefault((prompt, bool(correct)), []).append(fp)
        if epoch in epochs:
            grown[epoch] = [np.stack(fps) for fps in history.values()]
    return grown


def reference(keys: list[np.ndarray]) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(normalize(k.astype(np.float64)))
                for k in keys]  # fmt: skip


def fit_keys(keys: list[np.ndarray], tree_query: bool) -> list[np.ndarray]:
    """The service's fit of each key; `tree_query` lets the KD-tree answer the core-distance query."""
    dense_max = clustering._DENSE_MAX_POINTS
    clustering._DENSE_MAX_POINTS = 0 if tree_query else dense_max
    try:
        return [clustering.fit_labels(k, CONFIG) for k in keys]
    finally:
        clustering._DENSE_MAX_POINTS = dense_max


def in_pool(pool: ProcessPoolExecutor, processes: int, tree_query: bool) -> Callable[[list[np.ndarray]], list[Any]]:
    def fit(keys: list[np.ndarray]) -> list[Any]:
        order = split_keys(list(range(len(keys))), processes, {i: len(k) for i, k in enumerate(keys)})
        futures = [pool.submit(fit_keys, [keys[i] for i in part], tree_query) for part in order]
        labels: list[Any] = [None] * len(keys)
        for part, future in zip(order, futures, strict=True):
            for i, got in zip(part, future.result(), strict=True):
                labels[i] = got
        return labels

    return fit


def compare(opts: argparse.Namespace, pool: ProcessPoolExecutor, epoch: int, keys: list[np.ndarray]) -> list[dict]:
    p = opts.processes
    sides: dict[str, Callable[[list[np.ndarray]], list[Any]]] = {
        "reference": reference,
        "tree query, 1 process": lambda ks: fit_keys(ks, True),
        "service, 1 process": lambda ks: fit_keys(ks, False),
        f"tree query, {p} processes": in_pool(pool, p, True),
        f"service, {p} processes": in_pool(pool, p, False),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    labels: dict[str, list[Any]] = {}
    for _ in range(opts.repeats):
        for name, fit in sides.items():  # interleaved: every side sees the same load, repetition by repetition
            with measured(workers=os.getpid()) as side:
                labels[name] = fit(keys)
            runs[name].append(side.as_dict())
    want = labels["reference"]
    base_s = statistics.median(r["wall_s"] for r in runs["reference"])
    rows = []
    for name, measures in runs.items():
        wall = statistics.median(r["wall_s"] for r in measures)
        rows.append({
            "epochs": epoch,
            "side": name,
            "keys": len(keys),
            "mean_key_vectors": sum(len(k) for k in keys) / len(keys),
            "wall_s": wall,
            "keys_per_s": len(keys) / wall,
            "ratio_to_reference": base_s / wall,
            "cpu_s": statistics.median(r["cpu_s"]["workers"] for r in measures),  # this process and its workers
            "labels_differing": sum(not np.array_equal(a, b) for a, b in zip(labels[name], want, strict=True)),
            "load_1m": max(r["load_after"][0] for r in measures),
            "busy": any(r["busy"] for r in measures),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="20,100", help="epochs of memory to compare at, e.g. 20,100")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 prompts, 5 and 10 epochs, once")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.epochs, opts.prompts, opts.repeats = "5,10", 16, 1
    epochs = [int(e) for e in opts.epochs.split(",")]
    started = time.perf_counter()
    summary: dict[str, Any] = {"machine_before": describe(), "options": {k: str(v) for k, v in vars(opts).items()}}
    _warm()  # the serial sides fit as a refit worker does: assume_finite, no KD-tree input checks, one BLAS thread
    threadpool_limits(1, user_api="blas")
    grown = grow(opts.prompts, epochs, seed=2)
    context = multiprocessing.get_context("forkserver")
    rows = []
    with ProcessPoolExecutor(opts.processes, mp_context=context, initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:  # fmt: skip
        for future in [pool.submit(_warm) for _ in range(opts.processes)]:
            future.result()
        for epoch in epochs:
            rows += compare(opts, pool, epoch, grown[epoch])
    summary.update({"rows": rows, "machine_after": describe(), "wall_s": time.perf_counter() - started})
    opts.out.mkdir(parents=True, exist_ok=True)
    write_csv(opts.out / "refits.csv", rows)
    (opts.out / "refits.json").write_text(json.dumps(summary, indent=2))
    load = summary["machine_before"]["load_average"][0]
    print(f"\nRefit throughput ({summary['machine_before']['cpus']} CPUs, load at start {load:.2f}); "
          f"medians of {opts.repeats}, sides interleaved")  # fmt: skip
    for r in rows:
        flag = " BUSY" if r["busy"] else ""
        print(f"  {r['epochs']:>3} ep, {r['keys']} keys x {r['mean_key_vectors']:.0f} vectors  {r['side']:<26} "
              f"{r['keys_per_s']:7.1f} keys/s  {r['ratio_to_reference']:5.2f}x  cpu {r['cpu_s']:6.2f} s  "
              f"labels differing {r['labels_differing']}/{r['keys']}  load {r['load_1m']:.1f}{flag}")  # fmt: skip
    print(f"\nResults in {opts.out} ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
