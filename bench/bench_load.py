"""Load: N trainer clients scoring batches on one run at once, for T seconds, against a real `meds serve`.

Each client scores 512-rollout batches (32 prompts x 16 rollouts, drawn from a 512-prompt workload, so the
clients' batches touch each other's keys) back to back, or paced to a total ingest rate. It prints and
writes to bench/results/load.json, per segment: latency of one `score` call as the trainer sees it (p50,
p99, worst; retries included), rollouts/s, the service's refusals (503 past the in-flight bounds) and the
calls that failed anyway, `pending_refits` over time (sampled every second) and how long it took to drain
once ingest stopped, with the load average and the CPU time of each side.

    python -m bench.bench_load                          # 8 clients, 60 s, consistency fast, flat out
    python -m bench.bench_load --consistency exact
    python -m bench.bench_load --rates 2000,4000,8000   # paced segments: where do refits keep up?
    python -m bench.bench_load --quick                  # 8 clients, 8 s
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.bench_score import rollouts_of
from bench.machine import describe, measured
from bench.workload import Workload
from harness.server import ProcessServer
from meds_client import MedsClient, MedsError, RetryPolicy

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_PROMPTS = 32  # x 16 rollouts = 512 rollouts per request
REFUSALS = re.compile(r'^meds_score_refusals_total\{bound="(\w+)"\} ([0-9.e+]+)$', re.M)


@dataclass
class Segment:
    """One measured stretch of load on its own run."""

    run: str
    rate: float  # total rollouts/s the clients aim at; 0 = as fast as they can
    latencies: list[float] = field(default_factory=list)
    rollouts: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # failed calls by error class and first words
    retries: int = 0
    pending: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, segment: Segment, index: int, clients: int, until: float, retries: RetryPolicy) -> None:
    """One trainer: score batches until `until`, paced to its share of the segment's rate."""
    workload = Workload(seed=0)  # every client knows the same prompts and error modes...
    workload.rng = np.random.default_rng(1000 + index)  # ...and draws its own batches
    pace = 0.0 if segment.rate <= 0 else BATCH_PROMPTS * workload.rollouts * clients / segment.rate
    next_at = time.monotonic() + pace * index / clients
    with MedsClient(url, timeout=300, retries=retries, deadline=None) as client:
        while True:
            if pace:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += pace
            if time.monotonic() >= until:
                break
            chosen = workload.rng.choice(workload.prompts, BATCH_PROMPTS, replace=False).tolist()
            rollouts = rollouts_of(workload.step(chosen))
            started = time.perf_counter()
            try:
                client.score(segment.run, rollouts)
            except MedsError as exc:
                reason = f"{type(exc).__name__}: {str(exc)[:80]}"
                with segment.lock:
                    segment.failures += 1
                    segment.errors[reason] = segment.errors.get(reason, 0) + 1
                continue
            with segment.lock:
                segment.latencies.append(time.perf_counter() - started)
                segment.rollouts += len(rollouts)
        with segment.lock:
            segment.retries += client.stats.retries


def pending_of(http: httpx.Client, run: str) -> int:
    response = http.get(f"/v1/runs/{run}")
    return int(response.json()["stats"]["pending_refits"]) if response.status_code == 200 else 0


def refusals_of(http: httpx.Client) -> dict[str, float]:
    return {bound: float(value) for bound, value in REFUSALS.findall(http.get("/metrics").text)}


@dataclass(frozen=True)
class Load:
    """What one segment runs: how many clients, for how long, at what total rate, and how they retry."""

    clients: int = 8
    seconds: float = 60.0
    rate: float = 0.0  # total rollouts/s; 0 = flat out
    consistency: str = "fast"
    retries: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_retries=10))
    drain_timeout: float = 120.0


def run_segment(server: ProcessServer, load: Load) -> dict[str, Any]:
    """Run one segment of load on a new run of `server`, then wait for its refits to drain."""
    rate, consistency, retries = load.rate, load.consistency, load.retries
    run = f"load-{consistency}-{int(rate)}"
    segment = Segment(run, rate)
    assert server.proc is not None
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        http.put(f"/v1/runs/{run}", json={"consistency": consistency}).raise_for_status()
        refused_before = refusals_of(http)
        with measured(server=server.proc.pid) as sides:
            started = time.monotonic()
            until = started + load.seconds
            threads = [
                threading.Thread(target=client_loop, args=(server.base_url, segment, i, load.clients, until, retries))
                for i in range(load.clients)
            ]
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads):
                segment.pending.append((round(time.monotonic() - started, 2), pending_of(http, run)))
                time.sleep(1.0)
            for thread in threads:
                thread.join()
            ingest_s = time.monotonic() - started
        drained_at = time.monotonic()
        drain_s: float | None = None
        while time.monotonic() - drained_at < load.drain_timeout:
            pending = pending_of(http, run)
            if pending == 0:
                drain_s = time.monotonic() - drained_at
                break
            time.sleep(0.2)
        refused_after = refusals_of(http)
    lat = np.asarray(segment.latencies) if segment.latencies else np.zeros(1)
    half = [p for t, p in segment.pending if t >= load.seconds / 2]
    return {
        "run": run,
        "consistency": consistency,
        "target_rollouts_per_s": rate or None,
        "clients": load.clients,
        "seconds": round(ingest_s, 2),
        "calls": len(segment.latencies),
        "failed_calls": segment.failures,
        "errors": segment.errors,
        "client_retries": segment.retries,
        "refusals": {k: int(refused_after.get(k, 0) - refused_before.get(k, 0)) for k in ("run", "total")},
        "rollouts_per_s": round(segment.rollouts / ingest_s, 1),
        "latency_s": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p99": round(float(np.percentile(lat, 99)), 3),
            "max": round(float(lat.max()), 3),
        },
        "pending_refits": {
            "samples": segment.pending,
            "max": max((p for _, p in segment.pending), default=0),
            "second_half_max": max(half, default=0),
            "at_end": segment.pending[-1][1] if segment.pending else 0,
            "drain_s": None if drain_s is None else round(drain_s, 2),
        },
        "machine": sides.as_dict(),
    }


def report(result: dict[str, Any]) -> str:
    lat, pending, refusals = result["latency_s"], result["pending_refits"], result["refusals"]
    rate = result["target_rollouts_per_s"]
    drain = "never" if pending["drain_s"] is None else f"{pending['drain_s']:.1f} s"
    cpu = ", ".join(f"{k} {v:.0f} s" for k, v in result["machine"]["cpu_s"].items())
    return (
        f"{result['consistency']}, {result['clients']} clients, {result['seconds']:.0f} s"
        f"{f', paced to {rate:.0f} rollouts/s' if rate else ', flat out'}: "
        f"{result['rollouts_per_s']:.0f} rollouts/s in {result['calls']} calls; latency p50 {lat['p50']:.2f} s, "
        f"p99 {lat['p99']:.2f} s, worst {lat['max']:.2f} s; refusals {refusals['run']} (run) + {refusals['total']} "
        f"(total), {result['client_retries']} client retries, {result['failed_calls']} failed calls"
        f"{' ' + str(result['errors']) if result['errors'] else ''}; pending_refits "
        f"max {pending['max']}, second-half max {pending['second_half_max']}, {pending['at_end']} at the end, "
        f"drained in {drain}; load average {result['machine']['load_before']} -> {result['machine']['load_after']}; "
        f"CPU {cpu}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 clients for 8 s (a smoke run)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--consistency", choices=("fast", "exact"), default="fast")
    parser.add_argument("--rates", default="0", help="comma-separated total rollouts/s per segment; 0 = flat out")
    parser.add_argument("--retries", type=int, default=10, help="client retries per request (503s included)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--env", action="append", default=[], help="MEDS_X=value for the server (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.seconds, opts.drain_timeout = 8.0, 60.0
    retries = RetryPolicy(max_retries=opts.retries)
    loads = [
        Load(opts.clients, opts.seconds, float(rate), opts.consistency, retries, opts.drain_timeout)
        for rate in opts.rates.split(",")
    ]
    env = {"MEDS_LOG_LEVEL": "warning", **dict(item.split("=", 1) for item in opts.env)}
    results = []
    with tempfile.TemporaryDirectory(prefix="meds-load-") as tmp:
        server = ProcessServer(Path(tmp) / "data", env=env)
        server.start()
        try:
            for load in loads:
                result = run_segment(server, load)
                print(report(result), flush=True)
                results.append(result)
        finally:
            server.stop()
    opts.out.mkdir(parents=True, exist_ok=True)
    name = "load-quick.json" if opts.quick else f"load-{opts.consistency}.json"
    summary = {"machine": describe(), "server_env": env, "quick": opts.quick, "segments": results}
    (opts.out / name).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
