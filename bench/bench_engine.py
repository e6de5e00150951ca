"""The engine's share of a score step, in process: `ErrorMemory.score` of this tree against a baseline
revision, side by side in one run (A/B), at several epochs of memory.

Both sides open copies of one seeded SQLite store (a run grown by `epochs` steps of the 512 x 16 workload and
refitted), then score the same steps, interleaved A B B A..., each timed in CPU time of the scoring thread
(`time.thread_time`), and in wall time and CPU time of the whole process (work that the engine hands to other
threads, such as searches dealt over helper threads, shows only there). Between steps each side's store runs
its checkpoint, untimed, as the service's checkpoint thread does. No refit runs meanwhile: the run is
switched to the `fast` rule, so steps are scored against the seeded fits (a drained service has its keys
fitted before each step; here the newest steps stay unfitted, which changes no cost of the score path). Phases
are timed by wrapping the engine's functions; nested phases (the index search inside `predict`) are counted in
their parent too. Both sides must return identical results; the run stops otherwise.

    .venv/bin/python -m bench.bench_engine                          # 1, 20, 100 epochs against HEAD
    .venv/bin/python -m bench.bench_engine --epochs 1,20 --steps 7 --baseline c040f7f
    .venv/bin/python -m bench.bench_engine --baseline none          # this tree only
    .venv/bin/python -m bench.bench_engine --quick                  # a smoke run (a minute)

The baseline is extracted with `git archive` into a temporary folder and imported under another package
name, so both versions live in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bench.machine import BUSY_LOAD, describe, load_average, warn_busy
from bench.workload import Workload

ROOT = Path(__file__).resolve().parent.parent
RUN = "bench"

# (module, attribute) pairs timed as phases when a side's code has them; methods as "Class.method".
PHASES: list[tuple[str, str]] = [
    ("engine.memory", "ErrorMemory._score_rows"),
    ("engine.memory", "group_rows"),
    ("engine.memory", "predict"),
    ("engine.assign", "_near_ties"),
    ("storage.index", "ShardIndex.search"),
    ("storage.index", "ShardIndex.search_many"),
    ("engine.memory", "shape"),
    ("engine.memory", "_appends"),
    ("storage.sqlite", "SQLiteStore.commit"),
    ("storage.sqlite", "SQLiteStore.find_results"),
    ("engine.memory", "ErrorMemory._remember"),
    ("engine.memory", "with_metrics"),
]


def load_package(name: str, folder: Path) -> ModuleType:
    """Import the package in `folder` under the top-level name `name`."""
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def extract(revision: str, into: Path) -> Path:
    """The service package of a git revision, extracted into `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "service/meds_service"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "service" / "meds_service"


_phases: dict[str, float] = {}  # CPU seconds per phase of the step being scored


def _timed(phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, adding its CPU time to `_phases[phase]` (once per package: sides share the patched code)."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            _phases[phase] = _phases.get(phase, 0.0) + time.thread_time() - started

    timed._timed = True  # type: ignore[attr-defined]
    return timed


@dataclass
class Side:
    """One version of the engine over its own copy of the seeded store."""

    label: str
    package: str
    engine: Any = None
    store: Any = None
    cpu_ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)
    process_ms: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def module(self, name: str) -> Any:
        return importlib.import_module(f"{self.package}.{name}")

    def open(self, data: Path) -> None:
        store = self.module("storage.sqlite").SQLiteStore(data)
        refitter = self.module("workers").LocalRefitter(store.spec(), 1, processes=False)
        indexes = self.module("storage.index").ShardIndexes("cpu")
        self.module("storage.index").set_threads(1)
        self.store, self.refitter = store, refitter
        self.engine = self.module("engine").ErrorMemory(store, refitter, indexes=indexes)
        self.engine.load()
        # The kNN reference tier imports scikit-learn on its first near-tie (seconds); a running service has
        # it loaded in the background by then (`meds_knn_reference_loaded`): load it before timing.
        getattr(self.module("core.knn"), "load_reference", lambda: None)()
        # No refit runs while steps are measured: under the `exact` rule every step would wait for its keys'
        # refits. The `fast` rule scores against the fits of the seeded memory instead (as a drained service
        # does between steps), and the memory still grows by every step.
        run = self.engine.coordination.run(RUN)
        run.config = dataclasses.replace(run.config, consistency="fast")
        self._instrument()

    def close(self) -> None:
        self.refitter.close()
        self.store.close()

    def _instrument(self) -> None:
        for module_name, attribute in PHASES:
            module = self.module(module_name)
            owner: Any = module
            name = attribute
            if "." in attribute:
                owner_name, name = attribute.split(".")
                owner = getattr(module, owner_name, None)
            original = getattr(owner, name, None) if owner is not None else None
            if original is not None and not getattr(original, "_timed", False):
                setattr(owner, name, _timed(attribute, original))

    def score(self, step: dict[str, Any]) -> Any:
        batch = batch_of(self.module("core.types"), step)
        _phases.clear()
        started, wall, process = time.thread_time(), time.perf_counter(), time.process_time()
        outcome = self.engine.score(RUN, batch)
        self.cpu_ms.append(1e3 * (time.thread_time() - started))
        self.wall_ms.append(1e3 * (time.perf_counter() - wall))
        self.process_ms.append(1e3 * (time.process_time() - process))
        for phase, seconds in _phases.items():
            self.phases.setdefault(phase, []).append(1e3 * seconds)
        return outcome

    def summary(self) -> dict[str, Any]:
        return {
            "cpu_ms_median": round(statistics.median(self.cpu_ms), 2),
            "cpu_ms": [round(x, 2) for x in self.cpu_ms],
            "wall_ms_median": round(statistics.median(self.wall_ms), 2),
            "wall_ms_max": round(max(self.wall_ms), 2),
            "process_cpu_ms_median": round(statistics.median(self.process_ms), 2),
            "phases_ms_median": {p: round(statistics.median(v), 2) for p, v in self.phases.items()},
        }


def batch_of(types: Any, step: dict[str, Any]) -> Any:
    n = len(step["rollout_ids"])
    return types.RolloutBatch(
        list(step["rollout_ids"]),
        list(step["prompt_ids"]),
        np.where(step["correct"], int(types.Group.CORRECT), int(types.Group.WRONG)).astype(np.int64),
        np.asarray(step["rewards"], dtype=np.float64),
        np.asarray(step["fingerprints"], dtype=np.float32),
        np.ones(n, dtype=bool),
    )


def merged(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        name: [v for s in steps for v in s[name]]
        if isinstance(steps[0][name], list)
        else np.concatenate([s[name] for s in steps])
        for name in steps[0]
    }


def seed_store(folder: Path, epochs: int, prompts: int, workload: Workload) -> None:
    """A run grown by `epochs` steps in one batch, every key refitted (with this tree's engine)."""
    from meds_service.core import types
    from meds_service.engine import ErrorMemory
    from meds_service.storage.index import ShardIndexes
    from meds_service.storage.sqlite import SQLiteStore
    from meds_service.workers import LocalRefitter

    store = SQLiteStore(folder)
    refitter = LocalRefitter(store.spec(), 2)
    try:
        engine = ErrorMemory(store, refitter, indexes=ShardIndexes("cpu"))
        engine.load()
        engine.score(RUN, batch_of(types, merged([workload.step() for _ in range(epochs)])))
        report = engine.recluster(RUN, everything=True)
        print(
            f"  seeded {epochs} epochs: {report['refitted_keys']} keys refitted in {report['seconds']:.1f} s",
            flush=True,
        )
    finally:
        refitter.close()
        store.close()


def same(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.status, b.status) and a.records.tobytes() == b.records.tobytes())


@contextlib.contextmanager
def sides(baseline: str | None) -> Iterator[list[Side]]:
    with tempfile.TemporaryDirectory() as tmp:
        found = [Side("this tree", "meds_service")]
        if baseline is not None:
            load_package("meds_baseline", extract(baseline, Path(tmp)))
            found.insert(0, Side(f"baseline {baseline}", "meds_baseline"))
        yield found


def measure(epochs: int, opts: argparse.Namespace, baseline: str | None) -> dict[str, Any]:
    workload = Workload(prompts=opts.prompts, seed=epochs)
    with tempfile.TemporaryDirectory() as tmp, sides(baseline) as found:
        seed = (opts.seeds or Path(tmp)) / f"seed-{epochs}x{opts.prompts}"
        if seed.exists():
            for _ in range(epochs):  # the workload's state as if it had grown the store
                workload.step()
        else:
            seed_store(seed, epochs, opts.prompts, workload)
        for i, side in enumerate(found):
            shutil.copytree(seed, Path(tmp) / f"side{i}")
            side.open(Path(tmp) / f"side{i}")
        steps = [workload.step() for _ in range(opts.steps + 1)]
        load_before = load_average()
        for n, step in enumerate(steps):
            order = found if n % 2 == 0 else found[::-1]
            outcomes = [side.score(step) for side in order]
            for side in order:  # untimed, between steps, as a running service's checkpoint thread does
                side.store.checkpoint(idle_s=0)
            if not all(same(outcomes[0], o) for o in outcomes[1:]):
                raise SystemExit(f"step {n}: the sides' results differ")
        load_after = load_average()
        for side in found:  # the first step warms caches and lazy imports: not counted
            side.cpu_ms.pop(0)
            side.wall_ms.pop(0)
            side.process_ms.pop(0)
            for values in side.phases.values():
                values.pop(0)
            side.close()
        result = {
            "epochs": epochs,
            "rollouts_per_step": opts.prompts * 16,
            "steps": opts.steps,
            "load_before": load_before,
            "load_after": load_after,
            "busy": max(load_before[0], load_after[0]) > BUSY_LOAD,
            "sides": {side.label: side.summary() for side in found},
        }
        if max(load_before[0], load_after[0]) > BUSY_LOAD:
            warn_busy(load_after)
        return result


def report(result: dict[str, Any]) -> None:
    print(
        f"epochs {result['epochs']}: {result['rollouts_per_step']} rollouts/step, {result['steps']} steps, "
        f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}"
    )
    labels = list(result["sides"])
    phases = sorted(
        {p for s in result["sides"].values() for p in s["phases_ms_median"]},
        key=lambda p: [q for _, q in PHASES].index(p),
    )
    print(f"  {'CPU ms (median)':32s}" + "".join(f"{label:>22s}" for label in labels))
    print(
        f"  {'ErrorMemory.score':32s}" + "".join(f"{result['sides'][label]['cpu_ms_median']:22.1f}" for label in labels)
    )
    for phase in phases:
        cells = [result["sides"][label]["phases_ms_median"].get(phase) for label in labels]
        print(f"    {phase:30s}" + "".join("{:>22s}".format("-" if c is None else f"{c:.1f}") for c in cells))
    for title, name in (
        ("wall ms (median)", "wall_ms_median"),
        ("wall ms (slowest step)", "wall_ms_max"),
        ("process CPU ms (median)", "process_cpu_ms_median"),
    ):
        print(f"  {title:32s}" + "".join(f"{result['sides'][label][name]:22.1f}" for label in labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="1,20,100", help="comma-separated epochs of memory")
    parser.add_argument("--steps", type=int, default=7, help="measured steps per side")
    parser.add_argument("--prompts", type=int, default=512, help="prompts per step (16 rollouts each)")
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with, or 'none'")
    parser.add_argument("--seeds", type=Path, default=None, help="keep the seeded stores here, for later runs")
    parser.add_argument("--out", type=Path, default=None, help="write engine.json into this folder")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 32 prompts, 1 and 3 epochs, 2 steps")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.epochs, opts.prompts, opts.steps = "1,3", 32, 2
    baseline = None if opts.baseline == "none" else opts.baseline
    print(f"machine: {describe()}", flush=True)
    results = []
    for epochs in [int(e) for e in opts.epochs.split(",")]:
        results.append(measure(epochs, opts, baseline))
        report(results[-1])
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "engine.json").write_text(json.dumps({"machine": describe(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
