"""The prepared GPU benchmark runs (on the CPU here) and checks fingerprints against the naive computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_quick

pytestmark = pytest.mark.slow


def test_quick_gpu_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    run_quick("bench.bench_gpu", tmp_path)
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert all(row["cpu_ms"] > 0 for row in summary["knn"])
    (fingerprints,) = [row for row in summary["fingerprints"] if row["device"] == "cpu"]
    assert fingerprints["max_abs_error_vs_naive"] < 1e-4
