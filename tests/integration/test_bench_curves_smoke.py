"""The scaling-curve benchmark keeps working: a quick run writes every curve, with identical refit labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.support.bench import run_quick

pytestmark = pytest.mark.slow


def test_quick_curves_run(tmp_path: Path) -> None:
    done = run_quick("bench.bench_curves", tmp_path)
    summary = json.loads((tmp_path / "curves.json").read_text())
    refits = summary["refit_vs_reference"]
    assert refits and all(r["labels_differing"] == 0 and r["labels_compared"] == r["keys"] > 0 for r in refits)
    assert all(r["service_keys_per_s"] > 0 and r["reference_keys_per_s"] > 0 for r in refits)
    with (tmp_path / "memory_curve.csv").open() as f:
        steps = list(csv.DictReader(f))
    assert [int(s["epochs"]) for s in steps] == list(range(1, len(steps) + 1))
    assert sum(float(s["refit_keys"]) for s in steps) > 0  # the steps' refits were counted
    assert all(float(s["ingest_rollouts_per_s"]) > 0 and "load_1m" in s for s in steps)
    assert {int(r["dim"]) for r in summary["dims_checkpoints"]} == {64, 384}
    assert "load_average" in summary["machine_before"]
    for name in ("step_latency_vs_epochs", "refit_vs_epochs", "step_latency_vs_dims", "refit_vs_dims"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "Every key refitted" in done.stdout
