"""The store benchmark keeps working: a tiny run stores the same rollouts in both stores and reports each side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_tiny_store_benchmark_run(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    tiny = ["--prompts", "8", "--epochs", "2", "--samples", "2", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_store", *tiny],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    store = json.loads(out.read_text())["store"]
    assert store["counts"] == {"sqlite": 4 * 8 * 16, "redis": 4 * 8 * 16}
    assert store["ratio_redis_sqlite"] > 0 and store["redis"]["redis_cpu_ms"] >= 0
    assert len(store["sqlite"]["wall_ms"]) == 2 and store["sqlite"]["load_average_max"] >= 0
    assert "Redis / SQLite:" in done.stdout and "load average" in done.stdout
