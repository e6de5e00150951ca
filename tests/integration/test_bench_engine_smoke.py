"""The engine A/B benchmark keeps working: a quick run compares this tree with HEAD on identical results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_quick

pytestmark = pytest.mark.slow


def test_quick_engine_ab_run(tmp_path: Path) -> None:
    done = run_quick("bench.bench_engine", tmp_path)
    summary = json.loads((tmp_path / "engine.json").read_text())
    assert [r["epochs"] for r in summary["results"]] == [1, 3]
    for result in summary["results"]:
        assert list(result["sides"]) == ["baseline HEAD", "this tree"]
        assert "load_before" in result and "busy" in result
        for side in result["sides"].values():
            assert len(side["cpu_ms"]) == result["steps"] == 2 and side["cpu_ms_median"] > 0
            assert side["phases_ms_median"]["predict"] > 0  # phases are timed on both sides
    assert "ErrorMemory.score" in done.stdout
