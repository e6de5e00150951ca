"""The MEDS critical-path benchmark: the service against the reference procedure, on the same data.

Replays a realistic run — 512 prompts x 16 rollouts per step, 14-dim fingerprints, prompts with recurring
error modes — through the HTTP API with the real client, and in the same run times an in-process baseline
that implements the reference procedure (a scikit-learn NearestNeighbors fit per rollout and a synchronous
HDBSCAN refit of every touched key, as the authors' trainer does). Prints, with ratios:

- critical-path latency of one step (median, p95) with 1, 5 and 20 epochs of memory;
- background refit throughput (keys/s, vectors/s, every core) against the baseline's serial refits, and
  whether the labels are identical;
- bytes per stored rollout in the embedded store;
- JSON lists against the compact base64 matrix;
- 512- and 4,096-dim fingerprints;
and writes the scaling curves (latency against batch size and against memory size) as CSV and PNG under
bench/results/. The critical path goes through `score_columns` (the trainer's arrays as they are); the
wire-form table also times `score` with `Rollout` objects. Every timed step records the load average and
the CPU seconds of each side (this process; the server with its refit workers), and the run warns when
the machine was busy (bench/machine.py): figures from a loaded machine are not comparable.

    python -m bench.bench_score            # the full benchmark (about 15 minutes on 2 cores)
    python -m bench.bench_score --quick    # the critical-path ratio and the contention row only (about 3 minutes)
    python -m bench.bench_score --smoke    # every section at a tiny size, to check that it runs

Quick mode measures the same thing as the full run's 20-epoch row: the same 8,192-rollout step against
20 epochs of memory and the same reference baseline, with fewer samples. It builds the memory cheaply
(the 20 steps' rollouts in one call, refitted once, instead of a drained refit after each step) and
skips the other sections, so its ratio is comparable with the full run's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hdbscan
import httpx
import numpy as np
from sklearn.preprocessing import normalize
from tqdm import tqdm

from bench.machine import Sides, busy_cores, describe, measured, warn_busy
from bench.output import line_chart, write_csv
from bench.workload import Workload
from harness.reference import ReferenceMEDS, RefRollout
from harness.server import ProcessServer, wait_warm
from meds_client import MedsClient, Rollout, ScoreResults

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Options:
    prompts: int = 512
    rollouts: int = 16
    dim: int = 14
    memory: tuple[int, ...] = (1, 5, 20)
    samples: int = 7  # measured steps per memory size
    baseline_samples: int = 3
    batch_prompts: tuple[int, ...] = (16, 64, 256, 512, 1024, 2048)  # x 16 rollouts: 256 .. 32,768
    batch_memory: int = 5
    dims: tuple[int, ...] = (512, 4096)
    dims_memory: int = 5
    dims_samples: int = 3
    quick: bool = False
    """Only the critical path at the largest memory, built cheaply (see the module's docstring)."""
    out: Path = RESULTS

    @classmethod
    def quick_run(cls) -> Options:
        return cls(memory=(20,), samples=5, baseline_samples=1, quick=True)

    @classmethod
    def smoke_run(cls) -> Options:
        """Every section at a tiny size: that the benchmark works, not what it measures (tests run this)."""
        return cls(prompts=64, memory=(1, 3), samples=2, baseline_samples=1, batch_prompts=(16, 64, 128),
                   batch_memory=2, dims=(512,), dims_memory=1, dims_samples=1)  # fmt: skip


@dataclass
class StepLog:
    """Everything a run sent, in order, so that baselines and label checks replay the same data."""

    steps: list[dict[str, Any]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def rollouts_of(step: dict[str, Any]) -> list[Rollout]:
    return [
        Rollout(rid, pid, correct=bool(c), fingerprint=fp, reward=float(r))
        for rid, pid, c, fp, r in zip(step["rollout_ids"], step["prompt_ids"], step["correct"],
                                      step["fingerprints"], step["rewards"], strict=True)
    ]  # fmt: skip


def reference_rollouts(step: dict[str, Any]) -> list[RefRollout]:
    return [
        RefRollout(rid, pid, bool(c), fp.tolist(), float(r))
        for rid, pid, c, fp, r in zip(step["rollout_ids"], step["prompt_ids"], step["correct"],
                                      step["fingerprints"], step["rewards"], strict=True)
    ]  # fmt: skip


@contextmanager
def service(data_dir: Path) -> Iterator[ProcessServer]:
    server = ProcessServer(data_dir, env={"MEDS_LOG_LEVEL": "warning", "MEDS_REFIT_INTERVAL_S": "0.05"})
    server.start(timeout=120)
    wait_warm(server.base_url)  # steady-state steps: not the first seconds, while the reference tier loads
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Timed:
    """The steps of one measurement: each one's wall time, CPU seconds per side and load average."""

    sides: list[Sides] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [s.wall_s for s in self.sides]

    def cpu_ms(self, side: str) -> float:
        """Median CPU milliseconds of one side per step."""
        return 1e3 * statistics.median(s.cpu_s.get(side, 0.0) for s in self.sides)

    def summary(self) -> dict[str, Any]:
        return {
            "median_ms": 1e3 * statistics.median(self.seconds),
            **{f"{side}_cpu_ms": self.cpu_ms(side) for side in self.sides[0].cpu_s},
            "load_average_max": max(max(s.load_before[0], s.load_after[0]) for s in self.sides),
            "busy": any(s.busy for s in self.sides),
        }


def counters(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    wanted = ("meds_refit_keys_total", "meds_refit_vectors_total")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}


def drain(client: MedsClient, base_url: str, run: str) -> tuple[float, float, float]:
    """Wait until the run has no pending or running refit; returns (seconds, keys, vectors) refitted."""
    before = counters(base_url)
    started = time.perf_counter()
    while True:
        stats = client.get_run(run).stats
        if stats["pending_refits"] == 0 and stats["refits_in_flight"] == 0:
            break
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    after = counters(base_url)
    return (
        seconds,
        after.get("meds_refit_keys_total", 0) - before.get("meds_refit_keys_total", 0),
        after.get("meds_refit_vectors_total", 0) - before.get("meds_refit_vectors_total", 0),
    )


def score(client: MedsClient, run: str, step: dict[str, Any], server_pid: int | None = None) -> Sides:
    """One step through `score_columns`, timed with the CPU seconds of this process and of the server."""
    # The benchmark keeps every step it sent (for the baseline): freeze that heap so the cyclic GC does not
    # rescan it inside the timed call. A trainer's own heap is its own business.
    gc.collect()
    gc.freeze()
    with measured(**({} if server_pid is None else {"server": server_pid})) as sides:
        score_step(client, run, step)
    return sides


def score_step(client: MedsClient, run: str, step: dict[str, Any]) -> ScoreResults:
    columns = {name: step[name] for name in ("rollout_ids", "prompt_ids", "correct", "fingerprints", "rewards")}
    return client.score_columns(run, **columns)


def stored_bytes(data_dir: Path) -> int:
    """Bytes of live pages of the embedded store, WAL included (the file view a reader sees)."""
    db = sqlite3.connect(f"file:{data_dir / 'meds.sqlite3'}?mode=ro", uri=True)
    try:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page_size * pages)
    finally:
        db.close()


# ---- phases ---------------------------------------------------------------------------------------


def grow_memory(opts: Options, client: MedsClient, server: ProcessServer, wl: Workload, log: StepLog) -> dict[str, Any]:
    """One run, one step per epoch: latency of every step against its memory size, refits drained between.
    In quick mode the memory before the measured steps is sent back to back and refitted once."""
    total = max(opts.memory) + opts.samples
    steps: list[Sides | None] = []
    refits: list[tuple[float, float, float]] = []
    if opts.quick:
        # The epochs go in one call, which the client splits by prompt: a key is in one request only, so
        # under `exact` no key is refitted before its memory is complete (sent step by step, every step
        # would wait for the refit of every key). The stored vectors are those of the full run's steps.
        epochs = [wl.step() for _ in range(max(opts.memory))]
        log.steps.extend(epochs)
        merged = {name: [v for e in epochs for v in e[name]] if isinstance(epochs[0][name], list)
                  else np.concatenate([e[name] for e in epochs]) for name in epochs[0]}  # fmt: skip
        score_step(client, "grow", merged)
        drain(client, server.base_url, "grow")
        steps += [None] * len(epochs)
        refits += [(0.0, 0.0, 0.0)] * len(epochs)
    for _ in tqdm(range(len(steps), total), desc=f"service: {opts.prompts}x{opts.rollouts} steps, growing memory"):
        step = wl.step()
        log.steps.append(step)
        steps.append(score(client, "grow", step, server.proc.pid if server.proc else None))
        refits.append(drain(client, server.base_url, "grow"))
    return {"steps": steps, "refits": refits}


def contention(opts: Options, client: MedsClient, server: ProcessServer, wl: Workload, log: StepLog) -> Timed:
    """Steps like the measured ones (memory keeps growing by one epoch a step), with every core busy."""
    sides = []
    with busy_cores(os.cpu_count() or 2):
        for _ in tqdm(range(opts.samples), desc="service: steps with every core busy"):
            step = wl.step()
            log.steps.append(step)  # the run's memory, which the refit comparison replays
            sides.append(score(client, "grow", step, server.proc.pid if server.proc else None))
            drain(client, server.base_url, "grow")
    return Timed(sides)


def baseline_steps(opts: Options, log: StepLog, memory: int, samples: int) -> dict[str, Any]:
    """The reference procedure at `memory` epochs: seeded with the same earlier steps, then timed."""
    reference = ReferenceMEDS()
    history: dict[tuple[str, int], list[list[float]]] = {}
    for step in log.steps[:memory]:
        for pid, c, fp in zip(step["prompt_ids"], step["correct"], step["fingerprints"], strict=True):
            history.setdefault((pid, int(bool(c))), []).append(fp.tolist())
    for key, fps in tqdm(history.items(), desc=f"baseline: seeding {memory} epochs", leave=False):
        reference.seed(key, fps)
    times, refit_times, results = [], [], []
    for step in tqdm(log.steps[memory : memory + samples], desc=f"baseline: steps at {memory} epochs", leave=False):
        rollouts = reference_rollouts(step)
        reference.refit_seconds = 0.0
        with measured() as sides:
            results.append(reference.step(rollouts))
        times.append(sides)
        refit_times.append(reference.refit_seconds)
    return {"latency": Timed(times), "refit": refit_times, "results": results}


def refit_throughput(opts: Options, client: MedsClient, log: StepLog) -> dict[str, Any]:
    """Refit every key of the grown run: the service (worker processes) against serial reference refits,
    with the load average and each side's CPU seconds (bench/machine.py)."""
    with measured() as service_side:
        report = client.recluster("grow", all=True)
    keys: dict[tuple[str, int], list[np.ndarray]] = {}
    for step in log.steps:
        for pid, c, fp in zip(step["prompt_ids"], step["correct"], step["fingerprints"], strict=True):
            keys.setdefault((pid, int(bool(c))), []).append(fp)
    labels = {}
    with measured() as baseline_side:
        for key, fps in tqdm(keys.items(), desc="baseline: serial refit of every key", leave=False):
            x = np.stack(fps).astype(np.float64)
            labels[key] = (hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(normalize(x))
                           if len(x) >= 2 else np.full(len(x), -1))  # fmt: skip
    baseline_seconds = baseline_side.wall_s
    differing = 0
    for (pid, group), want in tqdm(labels.items(), desc="comparing labels", leave=False):
        got = client.get_prompt("grow", pid).groups["correct" if group else "wrong"].labels
        differing += list(got) != want.tolist()
    vectors = sum(len(v) for v in keys.values())
    return {
        "keys": report.refitted_keys,
        "vectors": report.vectors,
        "service_seconds": report.seconds,
        "baseline_seconds": baseline_seconds,
        "baseline_keys": len(keys),
        "baseline_vectors": vectors,
        "labels_compared": len(labels),
        "labels_differing": differing,
        "service_side": service_side.as_dict(),  # the refit workers' CPU is in the server's (not named here)
        "baseline_side": baseline_side.as_dict(),
    }


ENCODINGS = {  # name -> (client wire, how the step is handed to the client)
    "json_lists": ("json", "lists"),
    "json_base64_matrix": ("json", "objects"),
    "msgpack_objects": ("msgpack", "objects"),
    "msgpack_columns": ("msgpack", "columns"),
}


def encodings(opts: Options, server: ProcessServer) -> dict[str, Timed]:
    """The same steps in each wire form the client can send: one run per form, each first given the same
    `batch_memory` epochs, then measured in turns (refits drained between samples)."""
    base_url, pid = server.base_url, server.proc.pid if server.proc else 0
    out: dict[str, Timed] = {name: Timed() for name in ENCODINGS}
    clients = {name: MedsClient(base_url, wire=wire, max_batch_rollouts=65_536, timeout=600, deadline=None)
               for name, (wire, _) in ENCODINGS.items()}  # fmt: skip
    workloads = {name: Workload(prompts=opts.prompts, rollouts=opts.rollouts, dim=opts.dim, seed=11)
                 for name in ENCODINGS}  # fmt: skip
    try:
        for name, client in clients.items():
            for _ in tqdm(range(opts.batch_memory), desc=f"encodings: {name} memory", leave=False):
                client.score(f"wire-{name}", rollouts_of(workloads[name].step()))
                drain(client, base_url, f"wire-{name}")
        for _ in tqdm(range(opts.samples), desc="encodings", leave=False):
            for name, (_, form) in ENCODINGS.items():
                step = workloads[name].step()
                if form == "columns":
                    with measured(server=pid) as sides:
                        score_step(clients[name], f"wire-{name}", step)
                else:  # Rollout objects are built before the clock starts, as a trainer would hold them
                    rollouts = rollouts_of(step)
                    if form == "lists":
                        rollouts = [Rollout(r.rollout_id, r.prompt_id, correct=r.correct, fingerprint=np.asarray(
                            r.fingerprint).tolist(), reward=r.reward) for r in rollouts]  # fmt: skip
                    gc.collect()
                    gc.freeze()
                    with measured(server=pid) as sides:
                        clients[name].score(f"wire-{name}", rollouts)
                out[name].sides.append(sides)
                drain(clients[name], base_url, f"wire-{name}")
    finally:
        for client in clients.values():
            client.close()
    return out


def batch_sizes(opts: Options, client: MedsClient, base_url: str) -> list[dict[str, Any]]:
    wl = Workload(prompts=max(opts.batch_prompts), rollouts=opts.rollouts, dim=opts.dim, seed=7)
    for _ in tqdm(range(opts.batch_memory), desc="batch-size run: building memory"):
        client.score("batches", rollouts_of(wl.step()))
        drain(client, base_url, "batches")
    rows = []
    for prompts in tqdm(opts.batch_prompts, desc="batch sizes"):
        times = []
        for _ in range(3):
            step = wl.step(list(range(prompts)))
            times.append(score(client, "batches", step).wall_s)
            drain(client, base_url, "batches")
        rows.append({"rollouts": prompts * opts.rollouts, "median_ms": 1e3 * statistics.median(times),
                     "max_ms": 1e3 * max(times)})  # fmt: skip
    return rows


def high_dims(opts: Options, client: MedsClient, base_url: str) -> list[dict[str, Any]]:
    rows = []
    for dim in opts.dims:
        wl = Workload(prompts=opts.prompts, rollouts=opts.rollouts, dim=dim, seed=dim)
        run = f"dim{dim}"
        for _ in tqdm(range(opts.dims_memory), desc=f"dim {dim}: building memory"):
            client.score(run, rollouts_of(wl.step()))
            drain(client, base_url, run)
        times, refit = [], []
        for _ in tqdm(range(opts.dims_samples), desc=f"dim {dim}: measured steps", leave=False):
            times.append(score(client, run, wl.step()).wall_s)
            refit.append(drain(client, base_url, run)[0])
        rows.append({"dim": dim, "memory_epochs": opts.dims_memory, "median_ms": 1e3 * statistics.median(times),
                     "p95_ms": 1e3 * percentile(times, 95), "refit_s": statistics.median(refit)})  # fmt: skip
    return rows


# ---- report ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the critical-path ratio only (about 3 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where CSV, PNG and the summary JSON go")
    parser.add_argument("--smoke", action="store_true", help="every section at a tiny size (about a minute)")
    args = parser.parse_args(argv)
    opts = Options.quick_run() if args.quick else Options.smoke_run() if args.smoke else Options()
    opts.out = args.out
    opts.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"machine": describe(), "quick": opts.quick}
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="meds-bench-") as tmp:
        data = Path(tmp) / "data"
        with service(data) as server, MedsClient(server.base_url, max_batch_rollouts=65_536, timeout=600,
                                                 deadline=None) as client:  # fmt: skip
            wl = Workload(prompts=opts.prompts, rollouts=opts.rollouts, dim=opts.dim)
            log = StepLog()
            grown = grow_memory(opts, client, server, wl, log)
            contended = contention(opts, client, server, wl, log)
            if not opts.quick:
                rollouts_stored = client.get_run("grow").stats["rollouts"]
                summary["bytes_per_rollout"] = stored_bytes(data) / rollouts_stored
                summary["rollouts_stored"] = rollouts_stored
                summary["refit_throughput"] = refit_throughput(opts, client, log)
                encoded = encodings(opts, server)
                summary["encodings"] = {k: v.summary() for k, v in encoded.items()}
                summary["batch_sizes"] = batch_sizes(opts, client, server.base_url)
                summary["high_dims"] = high_dims(opts, client, server.base_url)

    critical = []
    for memory in opts.memory:
        service_steps = Timed([s for s in grown["steps"][memory : memory + opts.samples] if s is not None])
        refits = grown["refits"][memory : memory + opts.samples]
        base = baseline_steps(opts, log, memory, opts.baseline_samples)
        served = [drain_keys / max(drain_s, 1e-9) for drain_s, drain_keys, _ in refits]
        row = {"memory_epochs": memory, "samples": len(service_steps.sides),
               "service_p95_ms": 1e3 * percentile(service_steps.seconds, 95),
               "baseline_p95_ms": 1e3 * percentile(base["latency"].seconds, 95),
               "baseline_refit_median_ms": 1e3 * statistics.median(base["refit"]),
               "service_background_refit_median_s": statistics.median(r[0] for r in refits),
               "service_background_refit_keys_per_s": statistics.median(served)}  # fmt: skip
        row.update({f"service_{k}": v for k, v in service_steps.summary().items()})
        row.update({f"baseline_{k}": v for k, v in base["latency"].summary().items()})
        row["ratio"] = row["baseline_median_ms"] / row["service_median_ms"]
        critical.append(row)
    summary["critical_path"] = critical
    quiet_ms = critical[-1]["service_median_ms"]
    summary["contention"] = {**contended.summary(), "busy_processes": os.cpu_count() or 2,
                             "quiet_median_ms": quiet_ms, "memory_epochs": critical[-1]["memory_epochs"],
                             "ratio_to_quiet": 1e3 * statistics.median(contended.seconds) / quiet_ms}  # fmt: skip
    summary["machine_after"] = describe()
    summary["wall_s"] = time.perf_counter() - started
    summary["busy"] = any(row["service_busy"] or row["baseline_busy"] for row in critical) or any(
        v["busy"] for v in summary.get("encodings", {}).values()
    )
    if opts.quick:
        (opts.out / "summary_quick.json").write_text(json.dumps(summary, indent=2))
        report(opts, summary)
        return 0
    memory_rows = [{"memory_epochs": e, "latency_ms": 1e3 * s.wall_s} for e, s in enumerate(grown["steps"]) if s]
    summary["memory_curve"] = memory_rows

    write_csv(opts.out / "latency_vs_memory.csv", memory_rows)
    write_csv(opts.out / "latency_vs_batch.csv", summary["batch_sizes"])
    write_csv(opts.out / "critical_path.csv", critical)
    line_chart(opts.out / "latency_vs_memory.png",
               {"service": ([r["memory_epochs"] for r in memory_rows], [r["latency_ms"] for r in memory_rows])},
               "epochs of memory", "critical-path latency (ms)",
               f"one step of {opts.prompts * opts.rollouts} rollouts, dim {opts.dim}")  # fmt: skip
    batches = summary["batch_sizes"]
    line_chart(opts.out / "latency_vs_batch.png",
               {"service (median)": ([r["rollouts"] for r in batches], [r["median_ms"] for r in batches])},
               "rollouts per request", "critical-path latency (ms)",
               f"{opts.batch_memory} epochs of memory, dim {opts.dim}", logx=True)  # fmt: skip
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2))
    report(opts, summary)
    return 0


def report(opts: Options, summary: dict[str, Any]) -> None:
    n = opts.prompts * opts.rollouts
    machine, after = summary["machine"], summary["machine_after"]
    print(f"\nMEDS benchmark{' (quick)' if opts.quick else ''} ({machine['cpus']} CPUs, Python {machine['python']}; "
          f"load average {machine['load_average']} at the start, {after['load_average']} at the end; "
          f"{summary['wall_s']:.0f} s)")  # fmt: skip
    print(f"\nCritical path of one step: {opts.prompts} prompts x {opts.rollouts} rollouts = {n}, dim {opts.dim}, "
          "through score_columns (CPU ms per step: client / server with its refit workers)")  # fmt: skip
    print(f"{'memory':>8} {'service median':>15} {'p95':>9} {'CPU client/server':>19} {'baseline median':>16} "
          f"{'p95':>8} {'ratio':>7} {'max load':>9}")  # fmt: skip
    for row in summary["critical_path"]:
        load = max(row["service_load_average_max"], row["baseline_load_average_max"])
        cpu = f"{row['service_client_cpu_ms']:.0f} / {row['service_server_cpu_ms']:.0f} ms"
        print(f"{row['memory_epochs']:>5} ep {row['service_median_ms']:>12.1f} ms {row['service_p95_ms']:>6.1f} ms "
              f"{cpu:>19} "
              f"{row['baseline_median_ms'] / 1e3:>13.2f} s {row['baseline_p95_ms'] / 1e3:>5.2f} s "
              f"{row['ratio']:>6.0f}x {load:>9.2f}")  # fmt: skip
    if summary["busy"]:
        warn_busy(tuple(after["load_average"]))
    c = summary["contention"]
    print(f"\nContention: with {c['busy_processes']} processes spinning on every core, a step took "
          f"{c['median_ms']:.1f} ms (median of {opts.samples}; CPU client/server {c['client_cpu_ms']:.0f} / "
          f"{c['server_cpu_ms']:.0f} ms) against {c['quiet_median_ms']:.1f} ms quiet at {c['memory_epochs']} "
          f"epochs: {c['ratio_to_quiet']:.2f}x")  # fmt: skip
    if opts.quick:
        epochs, ratio = opts.memory[-1], summary["critical_path"][-1]["ratio"]
        print(f"\nRatio (service vs reference) at {epochs} epochs: {ratio:.0f}x (median of {opts.samples} steps; "
              f"the full run's {epochs}-epoch row measures the same)")  # fmt: skip
        print(f"\nResults in {opts.out / 'summary_quick.json'}")
        return
    r = summary["refit_throughput"]
    service_kps, base_kps = r["keys"] / r["service_seconds"], r["baseline_keys"] / r["baseline_seconds"]
    print(
        f"\nRefit of every key ({r['keys']} keys, {r['vectors']} vectors, all cores)",
        "vs the reference's serial refits:",
    )
    print(f"  service  {service_kps:8.0f} keys/s {r['vectors'] / r['service_seconds']:10.0f} vectors/s")
    print(f"  baseline {base_kps:8.0f} keys/s {r['baseline_vectors'] / r['baseline_seconds']:10.0f} vectors/s")
    print(
        f"  ratio    {service_kps / base_kps:8.2f}x; labels identical on "
        f"{r['labels_compared'] - r['labels_differing']}/{r['labels_compared']} keys"
    )
    for row in summary["critical_path"]:
        print(
            f"  background refit after a step at {row['memory_epochs']} ep: "
            f"{row['service_background_refit_median_s']:.2f} s "
            f"({row['service_background_refit_keys_per_s']:.0f} keys/s; the baseline spends "
            f"{row['baseline_refit_median_ms'] / 1e3:.2f} s refitting on the critical path)"
        )
    print(
        f"\nEmbedded store: {summary['bytes_per_rollout']:.0f} bytes per stored rollout "
        f"({summary['rollouts_stored']} rollouts, dim {opts.dim})"
    )
    print(f"Wire forms, one step at {opts.batch_memory} epochs (median; CPU ms client / server; max load):")
    for name, row in summary["encodings"].items():
        cpu = f"{row['client_cpu_ms']:.0f} / {row['server_cpu_ms']:.0f} ms"
        print(f"  {name:<20} {row['median_ms']:7.1f} ms   CPU {cpu:>15}   load {row['load_average_max']:.2f}")
    print("Batch size (latency_vs_batch.csv/.png): " + ", ".join(
        f"{row['rollouts']}: {row['median_ms']:.1f} ms" for row in summary["batch_sizes"]))  # fmt: skip
    for row in summary["high_dims"]:
        print(
            f"dim {row['dim']}: one step of {n} rollouts at {row['memory_epochs']} epochs of memory: "
            f"median {row['median_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms; background refit {row['refit_s']:.1f} s"
        )
    print(f"\nResults in {opts.out}")


if __name__ == "__main__":
    sys.exit(main())
