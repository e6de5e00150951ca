"""The search settings benchmark runs and finds every variant's neighbours within the rounding bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_quick

pytestmark = pytest.mark.slow


def test_quick_search_benchmark_runs(tmp_path: Path) -> None:
    run_quick("bench.bench_search", tmp_path)
    summary = json.loads((tmp_path / "search.json").read_text())
    assert {row["dim"] for row in summary["rows"]} == {14, 64}
    assert len({row["variant"] for row in summary["rows"]}) == 5
    assert all(row["max_score_gap"] <= row["twice_float32_bound"] for row in summary["rows"])
    assert all(row["wall_min_ms"] > 0 for row in summary["rows"])
