"""A live `meds serve` for an experiment: a subprocess on a free port, embedded store in a temporary folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from meds_client import MedsClient

__all__ = ["live_service"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_service(timeout_s: float = 60.0) -> Iterator[str]:
    """Start `meds serve` (one refit thread, quiet logs) and yield its base URL; stop it on exit."""
    with tempfile.TemporaryDirectory(prefix="meds-experiment-") as data_dir:
        port = _free_port()
        env = {
            **os.environ,
            "MEDS_REFIT_PROCESSES": "false",  # a tiny memory: refits in a thread, no extra processes
            "MEDS_REFIT_WORKERS": "1",
            "MEDS_LOG_LEVEL": "warning",
            "MEDS_SQLITE_SYNCHRONOUS": "NORMAL",
        }
        command = [sys.executable, "-m", "meds_service.cli", "serve", "--port", str(port), "--data-dir", data_dir]
        with open(os.path.join(data_dir, "service.log"), "wb") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, process, timeout_s)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with MedsClient(url, retries=0, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"meds serve exited with {process.returncode}")
            try:
                if client.ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
    raise TimeoutError(f"meds serve did not become ready at {url} within {timeout_s} s")
