"""What every benchmark records about the machine it measured on: the load average, the CPU time each side
spent, and a warning when the machine was busy (figures from a busy machine are not comparable)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

BUSY_LOAD = 1.5  # a 1-minute load average above this means something else was using the cores


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def describe() -> dict[str, Any]:
    """The machine, for a results file."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children (a server's refit workers)."""
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                continue
        return float(total)
    except psutil.Error:
        return 0.0


@dataclass
class Sides:
    """CPU seconds spent by each side of a measurement (this process, a server process...)."""

    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def busy(self) -> bool:
        return max(self.load_before[0], self.load_after[0]) > BUSY_LOAD

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_s.items()},
            "wall_s": round(self.wall_s, 3),
            "load_before": self.load_before,
            "load_after": self.load_after,
            "busy": self.busy,
        }


@contextmanager
def measured(**pids: int) -> Iterator[Sides]:
    """Time a block: wall time, this process's CPU time (as "client"), each named pid's CPU time, and the
    load average before and after. Warns on stderr when the machine was busy."""
    sides = Sides(load_before=load_average())
    own = time.process_time()
    others = {name: process_cpu_s(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    try:
        yield sides
    finally:
        sides.wall_s = time.perf_counter() - started
        sides.cpu_s["client"] = time.process_time() - own
        for name, pid in pids.items():
            sides.cpu_s[name] = process_cpu_s(pid) - others[name]
        sides.load_after = load_average()
        if sides.busy:
            warn_busy(sides.load_after)


_last_warning = 0.0


def warn_busy(load: tuple[float, float, float] | None = None) -> None:
    """Warn on stderr (at most once a minute: a long benchmark measures many times)."""
    global _last_warning
    if time.monotonic() - _last_warning < 60:
        return
    _last_warning = time.monotonic()
    load = load or load_average()
    print(
        f"WARNING: the machine was busy (load average {load[0]:.2f} > {BUSY_LOAD}); these figures are not "
        f"comparable with an idle run",
        file=sys.stderr,
    )


@contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """`n` processes that each spin on a core, as a trainer's own work or another job on a shared node does."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0)  # let the scheduler spread them
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
