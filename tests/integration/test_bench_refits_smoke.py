"""The refit-throughput benchmark keeps working: a quick run compares every side with the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_quick

pytestmark = pytest.mark.slow


def test_quick_refits_run(tmp_path: Path) -> None:
    done = run_quick("bench.bench_refits", tmp_path)
    summary = json.loads((tmp_path / "refits.json").read_text())
    rows = summary["rows"]
    assert {r["epochs"] for r in rows} == {5, 10}
    assert {r["side"] for r in rows} >= {"reference", "service, 1 process", "service, 2 processes"}
    assert all(r["labels_differing"] == 0 and r["keys"] > 0 and r["keys_per_s"] > 0 for r in rows)
    assert all("load_1m" in r and "cpu_s" in r for r in rows)
    assert "load_average" in summary["machine_before"]
    assert "keys/s" in done.stdout
