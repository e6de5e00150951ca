"""Scale-out numbers on Redis: score latency per store, refit throughput per worker size, replicas.

Starts its own redis-server (AOF, fsync always), API replicas and `meds worker`s, and prints:

1. one 8,192-rollout step (512 prompts x 16) at 5 epochs of memory: Redis store against the embedded store;
2. refit throughput of the queue (keys/s) with one warm `meds worker` of 1 and of 2 processes;
3. two trainers (two runs) at once against one API replica and against two replicas (steps/s in all).

    python -m bench.bench_scale
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.bench_score import rollouts_of
from bench.workload import Workload
from harness.redis_server import RedisServer
from harness.server import ProcessServer, ProcessWorker
from meds_client import MedsClient

STEPS = 5


def steps_latency(url: str, run: str, wl: Workload, warm: int, measured: int, drain_with: Any = None) -> list[float]:
    times = []
    with MedsClient(url, timeout=600, max_batch_rollouts=65_536) as client:
        for i in tqdm(range(warm + measured), desc=f"{run}: steps", leave=False):
            rollouts = rollouts_of(wl.step())
            started = time.perf_counter()
            client.score(run, rollouts)
            if i >= warm:
                times.append(time.perf_counter() - started)
            if drain_with is not None:
                drain_with(client, run)
    return times


def wait_refits(client: MedsClient, run: str) -> float:
    started = time.perf_counter()
    while client.get_run(run).stats["pending_refits"]:
        time.sleep(0.02)
    return time.perf_counter() - started


def main() -> int:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meds-scale-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)

        def started(process: Any, **options: Any) -> Any:
            """Start a server or worker now; it stops when the benchmark ends, however it ends."""
            process.start(**options)
            stack.callback(process.stop)
            return process

        redis = started(RedisServer(root / "redis"))
        env = {"MEDS_REDIS_URL": redis.url, "MEDS_LOG_LEVEL": "warning"}
        # 1. Redis against SQLite, same workload; refits drained between steps (workers in the API).
        for name, extra in (("sqlite", {}), ("redis", env)):
            server_env = {"MEDS_LOG_LEVEL": "warning", **extra}
            server = started(ProcessServer(root / f"api-{name}", env=server_env), timeout=120)
            times = steps_latency(server.base_url, f"lat-{name}", Workload(seed=1), 5, 7, wait_refits)
            out[f"{name}_step_ms"] = 1e3 * statistics.median(times)
            server.stop()
        # 2. Refit throughput of one worker, 1 and 2 processes: queue 5 epochs, then let it drain.
        api = started(ProcessServer(root / "api", env={**env, "MEDS_REFIT_BACKGROUND": "false"}), timeout=120)
        for processes in (1, 2):
            worker = started(ProcessWorker(root / f"w{processes}", env={**env, "MEDS_REFIT_WORKERS": str(processes),
                                                                     "MEDS_WORKER_METRICS_PORT": "0"}))  # fmt: skip
            with MedsClient(api.base_url) as client:
                steps_latency(api.base_url, f"warm{processes}", Workload(prompts=8, seed=3), 0, 1)
                wait_refits(client, f"warm{processes}")  # the worker's processes are up and warm
                assert worker.proc is not None
                os.killpg(worker.proc.pid, signal.SIGSTOP)  # queue the jobs while it is paused
                run = f"refit{processes}"
                steps_latency(api.base_url, run, Workload(seed=2), 0, STEPS)
                queued = client.get_run(run).stats["pending_refits"]
                os.killpg(worker.proc.pid, signal.SIGCONT)
                seconds = wait_refits(client, run)
            worker.stop()
            out[f"worker_{processes}_processes_keys_per_s"] = queued / seconds
        # 3. Two trainers at once: one replica, then two (each trainer on its own replica).
        second = started(ProcessServer(root / "api2", env={**env, "MEDS_REFIT_BACKGROUND": "false"}), timeout=120)
        started(ProcessWorker(root / "w", env={**env, "MEDS_WORKER_METRICS_PORT": "0"}))
        for replicas, urls in ((1, [api.base_url] * 2), (2, [api.base_url, second.base_url])):
            done: list[float] = []

            def trainer(url: str, run: str, done: list[float] = done) -> None:
                done.extend(steps_latency(url, run, Workload(prompts=256, seed=len(run)), 1, STEPS))

            threads = [threading.Thread(target=trainer, args=(u, f"t{replicas}-{i}")) for i, u in enumerate(urls)]
            begun = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - begun
            out[f"two_trainers_{replicas}_replicas_steps_per_s"] = len(done) / elapsed
            out[f"two_trainers_{replicas}_replicas_median_ms"] = 1e3 * statistics.median(done)
    print("\nScale-out on this machine (2 CPUs shared by Redis, the API processes and workers):")
    print(f"  one step of 8,192 rollouts at 5 epochs: embedded SQLite {out['sqlite_step_ms']:.0f} ms, "
          f"Redis {out['redis_step_ms']:.0f} ms")  # fmt: skip
    for processes in (1, 2):
        print(
            f"  meds worker with {processes} process(es): {out[f'worker_{processes}_processes_keys_per_s']:.0f} keys/s"
        )
    for replicas in (1, 2):
        print(f"  two trainers (4,096-rollout steps) on {replicas} replica(s): "
              f"{out[f'two_trainers_{replicas}_replicas_steps_per_s']:.1f} steps/s, "
              f"median {out[f'two_trainers_{replicas}_replicas_median_ms']:.0f} ms per step")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
