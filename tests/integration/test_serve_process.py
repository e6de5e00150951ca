"""`meds serve` as an operator runs it: a quiet JSON start, one line and a distinct exit code for fatal
start-up errors, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from harness.server import free_port, wait_ready
from meds_service import cli

ENV = {**os.environ, "MEDS_REFIT_WORKERS": "1", "MEDS_REFIT_PROCESSES": "false"}


def _meds(*args: str) -> list[str]:
    return [sys.executable, "-m", "meds_service.cli", *args]


def test_start_is_quiet_and_fatal_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "meds-data"
    first = subprocess.Popen(
        _meds("serve", "--port", str(port), "--data-dir", str(data)), env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=first)  # type: ignore[arg-type]
        httpx.get(f"http://127.0.0.1:{port}/v1/runs", timeout=10)

        # A second instance on the same data folder: one line that names the fix, exit code 3.
        second = subprocess.run(
            _meds("serve", "--port", str(free_port()), "--data-dir", str(data)),
            env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == cli.EXIT_STORE
        [line] = [json.loads(text) for text in second.stderr.splitlines() if '"critical"' in text]
        assert "already owns" in line["msg"] and "--data-dir" in line["msg"] and "MEDS_DATA_DIR" in line["msg"]
        assert "Traceback" not in second.stderr

        # The same port: one line that names --port / MEDS_PORT, exit code 4.
        taken = subprocess.run(
            _meds("serve", "--port", str(port), "--data-dir", str(tmp_path / "other"), "--log-format", "text"),
            env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert taken.returncode == cli.EXIT_ADDRESS
        assert "Traceback" not in taken.stderr
        [fatal] = [text for text in taken.stderr.splitlines() if " CRITICAL " in text]
        assert "--port" in fatal and "MEDS_PORT" in fatal
    finally:
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    lines = [json.loads(text) for text in err.splitlines()]  # every line is one JSON object
    assert not [entry for entry in lines if entry["level"] in ("info", "debug") and not entry["logger"].startswith(
        ("meds", "uvicorn"))], "library noise at INFO"  # fmt: skip
    assert not [entry for entry in lines if "faiss" in entry["logger"] or "AVX" in entry["msg"]]
    assert any(entry["logger"] == "meds.access" and entry["route"] == "/v1/runs" for entry in lines)
    # The open-files limit in effect and the connection cap kept below it.
    assert any(entry["msg"].startswith("open files limit") and entry["max_connections"] > 0 for entry in lines)
    assert any(entry["logger"] == "uvicorn.error" and entry["msg"] == "Shutting down" for entry in lines)
