"""The prepared GPU benchmark runs (on the CPU here) and checks fingerprints against the naive computation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quick_gpu_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert all(row["cpu_ms"] > 0 for row in summary["knn"])
    (fingerprints,) = [row for row in summary["fingerprints"] if row["device"] == "cpu"]
    assert fingerprints["max_abs_error_vs_naive"] < 1e-4
