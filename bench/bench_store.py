"""The store's share of a step, SQLite against Redis in one run: `find_results` + `commit` of one 512 x 16
step (dim 14) against 20 epochs of memory, the two stores measured in turn, step after step.

    python -m bench.bench_store                  # store level (about a minute)
    python -m bench.bench_store --service        # and the whole step through a real server on each store

Each figure comes with the load average and the CPU seconds of each side (this process; redis-server or the
service). Redis runs as the tests run it (AOF, fsync always); SQLite keeps `synchronous=FULL`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.machine import Sides, describe, load_average, measured
from bench.workload import Workload
from harness.redis_server import RedisServer
from meds_service.core.config import RunConfig
from meds_service.core.records import RunCounts
from meds_service.core.types import RESULT_DTYPE, Group, KeyAppend, MemoryKey, ScoredBatch
from meds_service.storage.redis import RedisStore
from meds_service.storage.sqlite import SQLiteStore

RUN = "bench"
RESULTS = Path(__file__).parent / "results"


class Store(Protocol):
    def find_results(self, run: str, prompt_ids: list[str], rollout_ids: list[str]) -> dict[str, Any]: ...
    def commit(self, run: str, config: RunConfig, batch: ScoredBatch) -> None: ...
    def counts(self, run: str) -> RunCounts: ...
    def close(self) -> None: ...


@dataclass
class Memory:
    """What the engine knows of each key when it builds a batch: its length (the next sequence number)."""

    n: dict[MemoryKey, int] = field(default_factory=dict)

    def batch(self, step: dict[str, Any], config: RunConfig, rng: np.random.Generator) -> ScoredBatch:
        """The batch the engine would commit for this step: one append per (prompt, group), rows by key."""
        keys = [MemoryKey(p, Group.of(bool(c))) for p, c in zip(step["prompt_ids"], step["correct"], strict=True)]
        rows: dict[MemoryKey, list[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)
        fitted = config.fitted_groups()
        appends, refits = [], []
        for key, idx in rows.items():
            first = self.n.get(key, 0)
            records = np.zeros(len(idx), dtype=RESULT_DTYPE)
            records["cluster"] = rng.integers(-1, 4, len(idx))
            records["size"] = rng.integers(0, 40, len(idx))
            records["penalty"] = rng.random(len(idx))
            records["shaped"] = rng.random(len(idx))
            ids = [step["rollout_ids"][i] for i in idx]
            appends.append(KeyAppend(key, first, step["fingerprints"][idx], 0, ids, records, step=len(self.n)))
            if key.group in fitted and first + len(idx) >= 2:
                refits.append(key)
            self.n[key] = first + len(idx)
        return ScoredBatch(appends, [], refits)


def one_step(store: Store, config: RunConfig, batch: ScoredBatch, step: dict[str, Any], **pids: int) -> Sides:
    """`find_results` then `commit`, as the engine calls them for one score request; timed."""
    gc.collect()
    with measured(**pids) as sides:
        known = store.find_results(RUN, step["prompt_ids"], step["rollout_ids"])
        store.commit(RUN, config, batch)
    assert not known, "a fresh step's rollouts were found in the store"
    return sides


@contextmanager
def stores(folder: Path) -> Iterator[dict[str, tuple[Store, dict[str, int]]]]:
    """The two stores, each with the pids whose CPU time it spends besides this process's."""
    server = RedisServer(folder / "redis")
    server.start()
    sqlite = SQLiteStore(folder / "sqlite")
    redis_store = RedisStore(server.url)
    try:
        assert server.proc is not None
        yield {"sqlite": (sqlite, {}), "redis": (redis_store, {"redis": server.proc.pid})}
    finally:
        sqlite.close()
        redis_store.close()
        server.stop()


def store_level(epochs: int, samples: int, wl: Workload) -> dict[str, Any]:
    """Memory of `epochs` steps in both stores, then `samples` steps timed on each, alternating."""
    config = RunConfig(dim=wl.dim)
    rng = np.random.default_rng(1)
    timed: dict[str, list[Sides]] = {"sqlite": [], "redis": []}
    with tempfile.TemporaryDirectory() as tmp, stores(Path(tmp)) as both:
        memories = {name: Memory() for name in both}
        for _ in range(epochs):
            step = wl.step()
            for name, (store, _) in both.items():
                store.commit(RUN, config, memories[name].batch(step, config, rng))
        for i in range(samples):
            step = wl.step()
            order = list(both) if i % 2 == 0 else list(reversed(both))
            for name in order:
                store, pids = both[name]
                batch = memories[name].batch(step, config, rng)
                timed[name].append(one_step(store, config, batch, step, **pids))
        counts = {name: store.counts(RUN).rollouts for name, (store, _) in both.items()}
    return {"counts": counts, **summarise(timed)}


def summarise(timed: dict[str, list[Sides]]) -> dict[str, Any]:
    """Medians per store (wall ms, CPU ms per side), the load seen, and Redis / SQLite."""
    out: dict[str, Any] = {}
    for name, sides in timed.items():
        out[name] = {
            "median_ms": round(1e3 * statistics.median(s.wall_s for s in sides), 1),
            "wall_ms": [round(1e3 * s.wall_s, 1) for s in sides],
            **{
                f"{side}_cpu_ms": round(1e3 * statistics.median(s.cpu_s[side] for s in sides), 1)
                for side in sides[0].cpu_s
            },
            "load_average_max": max(max(s.load_before[0], s.load_after[0]) for s in sides),
            "busy": any(s.busy for s in sides),
        }
    out["ratio_redis_sqlite"] = round(out["redis"]["median_ms"] / out["sqlite"]["median_ms"], 2)
    cpu = {name: sum(v for k, v in out[name].items() if k.endswith("_cpu_ms")) for name in timed}
    out["ratio_redis_sqlite_cpu"] = round(cpu["redis"] / cpu["sqlite"], 2)
    return out


def service_level(epochs: int, samples: int, wl: Workload) -> dict[str, Any]:
    """The whole step through a real server and the client (msgpack columns), on each store in turn."""
    from bench.bench_score import drain, score_step
    from harness.server import ProcessServer, wait_warm
    from meds_client import MedsClient

    memory = [wl.step() for _ in range(epochs)]
    merged = {name: [v for e in memory for v in e[name]] if isinstance(memory[0][name], list)
              else np.concatenate([e[name] for e in memory]) for name in memory[0]}  # fmt: skip
    steps = [wl.step() for _ in range(samples)]
    timed: dict[str, list[Sides]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp) / "redis")
        redis_server.start()
        envs = {"sqlite": {}, "redis": {"MEDS_REDIS_URL": redis_server.url}}
        try:
            for name, env in envs.items():
                server = ProcessServer(Path(tmp) / name, env={"MEDS_LOG_LEVEL": "warning",
                                                              "MEDS_REFIT_INTERVAL_S": "0.05", **env})  # fmt: skip
                server.start(timeout=180)
                try:
                    wait_warm(server.base_url)  # steady-state steps, as bench_score and bench_curves time them
                    client = MedsClient(server.base_url, timeout=600)
                    score_step(client, RUN, merged)
                    drain(client, server.base_url, RUN)
                    timed[name] = []
                    assert server.proc is not None and redis_server.proc is not None
                    # The CPU of redis-server counts on the Redis side (it is no child of the service).
                    pids = {"server": server.proc.pid, **({"redis": redis_server.proc.pid} if name == "redis" else {})}
                    for step in steps:
                        gc.collect()
                        gc.freeze()  # the steps kept for the run: not rescanned inside the timed call
                        with measured(**pids) as sides:
                            score_step(client, RUN, step)
                        timed[name].append(sides)
                        drain(client, server.base_url, RUN)
                    client.close()
                finally:
                    server.stop()
        finally:
            redis_server.stop()
    return summarise(timed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=9, help="timed steps per store")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--service", action="store_true", help="also time whole steps through a server")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    opts = parser.parse_args(argv)
    wl = Workload(prompts=opts.prompts)
    results: dict[str, Any] = {"machine": describe(), "epochs": opts.epochs, "samples": opts.samples,
                               "step": f"{opts.prompts} x {wl.rollouts}, dim {wl.dim}"}  # fmt: skip
    started = time.process_time()
    results["store"] = store_level(opts.epochs, opts.samples, wl)
    report("store: find_results + commit", results["store"])
    if opts.service:
        results["service"] = service_level(opts.epochs, opts.samples, Workload(prompts=opts.prompts, seed=1))
        report("service: whole step, msgpack through the client", results["service"])
    results["bench_cpu_s"] = round(time.process_time() - started, 2)
    results["load_average_end"] = load_average()
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average at the end {results['load_average_end']}, this process's CPU {results['bench_cpu_s']} s")


def report(title: str, part: dict[str, Any]) -> None:
    print(f"{title} ({part.get('counts', '')})")
    for name in ("sqlite", "redis"):
        side = part[name]
        cpu = ", ".join(f"{k.removesuffix('_cpu_ms')} CPU {v} ms" for k, v in side.items() if k.endswith("_cpu_ms"))
        print(f"  {name:7s} median {side['median_ms']:7.1f} ms ({cpu}); load max {side['load_average_max']}"
              f"{' BUSY' if side['busy'] else ''}; steps {side['wall_ms']}")  # fmt: skip
    print(f"  Redis / SQLite: {part['ratio_redis_sqlite']} (wall), {part['ratio_redis_sqlite_cpu']} (CPU, all sides)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
