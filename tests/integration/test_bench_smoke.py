"""The benchmark keeps working: a quick run produces every result it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_quick

pytestmark = pytest.mark.slow


def test_quick_benchmark_run(tmp_path: Path) -> None:
    done = run_quick("bench.bench_score", tmp_path, "--smoke")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["refit_throughput"]["labels_differing"] == 0
    assert all(row["ratio"] > 1 for row in summary["critical_path"])
    assert 0 < summary["bytes_per_rollout"] < 1000
    for name in ("latency_vs_memory", "latency_vs_batch"):
        assert (tmp_path / f"{name}.csv").stat().st_size > 0 and (tmp_path / f"{name}.png").stat().st_size > 0
    assert summary["contention"]["ratio_to_quiet"] > 0 and summary["contention"]["busy_processes"] >= 1
    assert "Critical path of one step" in done.stdout and "Contention:" in done.stdout
