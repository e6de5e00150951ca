"""Scaling curves: step latency and refits against memory (epochs of history) and fingerprint dimension.

Memory is built cheaply: fewer prompts than a real step (64 instead of 512) but the real per-key size, 16
rollouts per prompt per epoch, so a key holds what it would after that many epochs. One run grows one epoch
(one step) at a time on the embedded store (SQLite) with the local refit pool; after every step the refits
are drained, so each row has the step's latency, the refits it caused and the ingest rate the pipeline
sustains with `pending_refits` back to zero after every step (the step's rollouts over the seconds from
sending it until its refits are done). This is done with 1 and 2 refit worker processes
(`MEDS_REFIT_WORKERS`).

At the epochs in `refit_epochs` every key is refitted at once (`POST /runs/{run}/recluster?all=true`) and
compared with the serial reference, `hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit` per key in
this process: keys/s of both, and every label of every key compared.

Dimensions 64, 384 and 4,096 are grown on fewer prompts and epochs (a 4,096-dim key of 320 vectors takes
most of a second to fit: HDBSCAN switches to Prim's algorithm above 60 dimensions, O(n^2 d)).

Every figure carries the load average and the CPU seconds each side spent (bench/machine.py); a busy machine
is flagged. Results: CSV, PNG and curves.json under bench/results/curves/.

    python -m bench.bench_curves            # full (about 15 minutes on 2 idle cores)
    python -m bench.bench_curves --quick    # smoke run (about 3 minutes)
    python -m bench.bench_curves --workers 2 --dims ""   # memory curve and refit comparison only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hdbscan
import numpy as np
from sklearn.preprocessing import normalize
from tqdm import tqdm

from bench.bench_score import counters, drain, score
from bench.machine import describe, measured
from bench.output import line_chart, write_csv
from bench.workload import Workload
from harness.server import ProcessServer, wait_warm
from meds_client import MedsClient

RESULTS = Path(__file__).resolve().parent / "results" / "curves"


@dataclass
class Options:
    prompts: int = 64
    rollouts: int = 16
    dim: int = 14
    epochs: int = 100  # the memory curve grows to this many epochs
    checkpoints: tuple[int, ...] = (1, 5, 10, 20, 50, 100)
    refit_epochs: tuple[int, ...] = (20, 100)  # every key refitted and compared with the serial reference
    refit_repeats: int = 3
    workers: tuple[int, ...] = (1, 2)
    dims: tuple[int, ...] = (64, 384, 4096)
    dims_prompts: int = 8
    dims_epochs: int = 20
    out: Path = RESULTS
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Options:
        return cls(
            prompts=16,
            epochs=10,
            checkpoints=(1, 5, 10),
            refit_epochs=(10,),
            refit_repeats=1,
            workers=(2,),
            dims=(64, 384),
            dims_prompts=4,
            dims_epochs=5,
            quick=True,
        )


@dataclass
class Grown:
    """A run grown step by step: one row per step, plus the refit comparisons made on the way."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    refits: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def service(data_dir: Path, workers: int) -> Iterator[ProcessServer]:
    env = {"MEDS_LOG_LEVEL": "warning", "MEDS_REFIT_INTERVAL_S": "0.05", "MEDS_REFIT_WORKERS": str(workers)}
    server = ProcessServer(data_dir, env=env)
    server.start(timeout=180)
    wait_warm(server.base_url)
    try:
        yield server
    finally:
        server.stop()


def grow(opts: Options, server: ProcessServer, run: str, wl: Workload, epochs: int, refit_at: tuple[int, ...]) -> Grown:
    """Grow `run` one epoch per step; after each step drain its refits. At `refit_at` epochs, refit every key
    and compare with the serial reference."""
    assert server.proc is not None
    pid = server.proc.pid
    grown = Grown()
    history: dict[tuple[str, bool], list[np.ndarray]] = {}
    with MedsClient(server.base_url, max_batch_rollouts=65_536, timeout=600) as client:
        for epoch in tqdm(range(1, epochs + 1), desc=f"{run}: growing", leave=False):
            step = wl.step()
            for pid_, correct, fp in zip(step["prompt_ids"], step["correct"], step["fingerprints"], strict=True):
                history.setdefault((pid_, bool(correct)), []).append(fp)
            before = counters(server.base_url)
            with measured(server=pid) as side:
                seconds = score(client, run, step).wall_s
                drain_s = drain(client, server.base_url, run)[0]
            after = counters(server.base_url)
            keys = after.get("meds_refit_keys_total", 0) - before.get("meds_refit_keys_total", 0)
            vectors = after.get("meds_refit_vectors_total", 0) - before.get("meds_refit_vectors_total", 0)
            n = len(step["prompt_ids"])
            # The step's refits start when its batch is committed, before the answer; they are over when
            # `pending_refits` is back to 0, so the step costs score + drain and the pipeline sustains
            # n / (score + drain) rollouts/s with nothing left pending (refits of a step never overlap the
            # next one here; under the exact rule a step would wait for them anyway).
            grown.steps.append({
                "epochs": epoch,
                "step_rollouts": n,
                "step_ms": 1e3 * seconds,
                "refit_drain_s": drain_s,
                "refit_keys": keys,
                "refit_vectors": vectors,
                "ingest_rollouts_per_s": n / (seconds + drain_s),
                **flat(side.as_dict()),
            })  # fmt: skip
            if epoch in refit_at:
                grown.refits.append(refit_vs_reference(opts, client, pid, run, epoch, history))
    return grown


def reference_labels(fingerprints: list[np.ndarray]) -> np.ndarray:
    x = np.stack(fingerprints).astype(np.float64)
    if len(x) < 2:
        return np.full(len(x), -1)
    return hdbscan.HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(normalize(x))


def refit_vs_reference(
    opts: Options, client: MedsClient, pid: int, run: str, epoch: int, history: dict[tuple[str, bool], list[np.ndarray]]
) -> dict[str, Any]:
    """Every key refitted by the service (its worker processes) and serially by the reference, then every
    label compared. Median of `refit_repeats` timings each."""
    service_s, service_sides, report = [], [], None
    for _ in range(opts.refit_repeats):
        with measured(server=pid) as side:
            report = client.recluster(run, all=True)
        service_s.append(report.seconds)
        service_sides.append(side.as_dict())
    assert report is not None
    base_s, base_sides, labels = [], [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(opts.refit_repeats):
            with measured() as side:
                started = time.perf_counter()
                labels = {key: reference_labels(fps) for key, fps in history.items()}
                base_s.append(time.perf_counter() - started)
            base_sides.append(side.as_dict())
    differing = 0
    for (prompt, correct), want in labels.items():
        got = client.get_prompt(run, prompt).groups["correct" if correct else "wrong"].labels
        differing += list(got) != want.tolist()
    service_median, base_median = statistics.median(service_s), statistics.median(base_s)
    service_kps, base_kps = report.refitted_keys / service_median, len(labels) / base_median
    return {
        "run": run,
        "epochs": epoch,
        "keys": report.refitted_keys,
        "vectors": report.vectors,
        "mean_key_vectors": report.vectors / max(report.refitted_keys, 1),
        "service_s": service_median,
        "service_keys_per_s": service_kps,
        "reference_s": base_median,
        "reference_keys_per_s": base_kps,
        "ratio": service_kps / base_kps,
        "labels_compared": len(labels),
        "labels_differing": differing,
        "service_load_1m": max(s["load_after"][0] for s in service_sides),
        "service_server_cpu_s": statistics.median(s["cpu_s"]["server"] for s in service_sides),
        "reference_cpu_s": statistics.median(s["cpu_s"]["client"] for s in base_sides),
        "reference_load_1m": max(s["load_after"][0] for s in base_sides),
        "busy": any(s["busy"] for s in service_sides + base_sides),
    }


def flat(sides: dict[str, Any]) -> dict[str, Any]:
    return {
        "load_1m": sides["load_after"][0],
        "server_cpu_s": sides["cpu_s"].get("server", 0.0),
        "client_cpu_s": sides["cpu_s"]["client"],
        "busy": sides["busy"],
    }


def at_checkpoints(steps: list[dict[str, Any]], checkpoints: tuple[int, ...]) -> list[dict[str, Any]]:
    """The curve at each checkpoint: medians over the last three steps up to it (fewer at the start)."""
    rows = []
    for epoch in checkpoints:
        window = [s for s in steps if epoch - 3 < s["epochs"] <= epoch]
        if not window:
            continue
        rows.append({
            "epochs": epoch,
            "step_ms": statistics.median(s["step_ms"] for s in window),
            "refit_drain_s": statistics.median(s["refit_drain_s"] for s in window),
            "refit_keys": statistics.median(s["refit_keys"] for s in window),
            "ingest_rollouts_per_s": statistics.median(s["ingest_rollouts_per_s"] for s in window),
            "load_1m": max(s["load_1m"] for s in window),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where CSV, PNG and curves.json go")
    parser.add_argument("--workers", help="refit process counts to grow the memory curve with, e.g. 1,2")
    parser.add_argument("--dims", help="dimensions of the dims curve, e.g. 64,384,4096 (empty: none)")
    args = parser.parse_args(argv)
    opts = Options.quick_run() if args.quick else Options()
    opts.out = args.out
    if args.workers:
        opts.workers = tuple(int(w) for w in args.workers.split(","))
    if args.dims is not None:
        opts.dims = tuple(int(d) for d in args.dims.split(",") if d)
    opts.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {"machine_before": describe(), "options": {k: str(v) for k, v in asdict(opts).items()}}
    memory_rows, refit_rows, dims_rows, checkpoint_rows = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="meds-curves-") as tmp:
        for workers in opts.workers:
            with service(Path(tmp) / f"memory-{workers}", workers) as server:
                wl = Workload(prompts=opts.prompts, rollouts=opts.rollouts, dim=opts.dim, seed=workers)
                grown = grow(opts, server, f"memory-{workers}w", wl, opts.epochs, opts.refit_epochs)
            memory_rows += [{"workers": workers, **row} for row in grown.steps]
            refit_rows += [{"workers": workers, **row} for row in grown.refits]
            checkpoint_rows += [{"workers": workers, **r} for r in at_checkpoints(grown.steps, opts.checkpoints)]
        if opts.dims:
            with service(Path(tmp) / "dims", max(opts.workers)) as server:
                for dim in opts.dims:
                    wl = Workload(prompts=opts.dims_prompts, rollouts=opts.rollouts, dim=dim, seed=dim)
                    grown = grow(opts, server, f"dim-{dim}", wl, opts.dims_epochs, ())
                    dims_rows += [{"dim": dim, **row} for row in grown.steps]
    summary.update({
        "memory_checkpoints": checkpoint_rows,
        "refit_vs_reference": refit_rows,
        "dims_checkpoints": [{"dim": d, **r} for d in opts.dims
                             for r in at_checkpoints([s for s in dims_rows if s["dim"] == d], (1, 5, 10, 20))],
        "machine_after": describe(),
        "wall_s": time.perf_counter() - started,
    })  # fmt: skip
    write_csv(opts.out / "memory_curve.csv", memory_rows)
    write_csv(opts.out / "memory_checkpoints.csv", checkpoint_rows)
    write_csv(opts.out / "refit_vs_reference.csv", refit_rows)
    write_csv(opts.out / "dims_curve.csv", dims_rows)
    (opts.out / "curves.json").write_text(json.dumps(summary, indent=2))
    by = {w: [r for r in memory_rows if r["workers"] == w] for w in opts.workers}
    steps_title = f"{opts.prompts} prompts x {opts.rollouts} rollouts per step, dim {opts.dim}"
    line_chart(opts.out / "step_latency_vs_epochs.png",
         {f"{w} refit process(es)": ([r["epochs"] for r in rs], [r["step_ms"] for r in rs]) for w, rs in by.items()},
         "epochs of memory", "step latency (ms)", steps_title)  # fmt: skip
    line_chart(opts.out / "refit_vs_epochs.png",
         {f"{w} refit process(es)": ([r["epochs"] for r in rs], [r["refit_drain_s"] for r in rs])
          for w, rs in by.items()}, "epochs of memory", "refits of one step (s)", steps_title)  # fmt: skip
    if opts.dims:
        dims = {d: [r for r in dims_rows if r["dim"] == d] for d in opts.dims}
        processes = max(opts.workers)
        dims_title = f"{opts.dims_prompts} prompts x {opts.rollouts} rollouts per step, {processes} refit processes"
        line_chart(opts.out / "step_latency_vs_dims.png",
             {f"dim {d}": ([r["epochs"] for r in rs], [r["step_ms"] for r in rs]) for d, rs in dims.items()},
             "epochs of memory", "step latency (ms)", dims_title)  # fmt: skip
        line_chart(opts.out / "refit_vs_dims.png",
             {f"dim {d}": ([r["epochs"] for r in rs], [r["refit_drain_s"] for r in rs]) for d, rs in dims.items()},
             "epochs of memory", "refits of one step (s)", dims_title)  # fmt: skip
    report(summary)
    print(f"\nResults in {opts.out} ({summary['wall_s']:.0f} s)")
    return 0


def busy(row: dict[str, Any]) -> str:
    return " (BUSY: not comparable with an idle run)" if row["busy"] else ""


def report(summary: dict[str, Any]) -> None:
    load = summary["machine_before"]["load_average"]
    print(f"\nScaling curves ({summary['machine_before']['cpus']} CPUs, load average at start {load[0]:.2f})")
    print(f"{'workers':>7} {'epochs':>6} {'step ms':>8} {'refit s':>8} {'keys':>5} {'ingest/s':>9} {'load':>5}")
    for r in summary["memory_checkpoints"]:
        print(f"{r['workers']:>7} {r['epochs']:>6} {r['step_ms']:>8.1f} {r['refit_drain_s']:>8.3f} "
              f"{r['refit_keys']:>5.0f} {r['ingest_rollouts_per_s']:>9.0f} {r['load_1m']:>5.1f}")  # fmt: skip
    print("\nEvery key refitted: service (worker processes) against the serial reference")
    for r in summary["refit_vs_reference"]:
        print(f"  {r['workers']} process(es), {r['epochs']} epochs ({r['keys']} keys, {r['mean_key_vectors']:.0f} "
              f"vectors each): {r['service_keys_per_s']:.0f} vs {r['reference_keys_per_s']:.0f} keys/s = "
              f"{r['ratio']:.2f}x; labels identical on {r['labels_compared'] - r['labels_differing']}/"
              f"{r['labels_compared']} keys; load {r['service_load_1m']:.1f}{busy(r)}")  # fmt: skip
    print(f"\n{'dim':>5} {'epochs':>6} {'step ms':>8} {'refit s':>8}")
    for r in summary["dims_checkpoints"]:
        print(f"{r['dim']:>5} {r['epochs']:>6} {r['step_ms']:>8.1f} {r['refit_drain_s']:>8.3f}")


if __name__ == "__main__":
    sys.exit(main())
