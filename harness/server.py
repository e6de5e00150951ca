"""Real uvicorn servers for tests: in a thread (fast) or as a subprocess (for SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from meds_service.app import create_app
from meds_service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll `predicate` until it holds; TimeoutError if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError("condition not reached")


# How long a server may take to become ready: it imports the scientific stack and warms up its refit
# processes, which takes 10 s on an idle 2-core machine and several times that with test files in parallel.
READY_TIMEOUT_S = 180.0


def wait_ready(
    base_url: str,
    timeout: float = READY_TIMEOUT_S,
    proc: subprocess.Popen[bytes] | None = None,
    thread: threading.Thread | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if thread is not None and not thread.is_alive():
            raise RuntimeError("server thread stopped (startup failed; see the log)")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not ready after {timeout}s")


def wait_warm(base_url: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until a ready service has also loaded its kNN reference tier in the background
    (`meds_knn_reference_loaded`): before that, a step that meets a true near-tie waits seconds for the import,
    which a benchmark of steady-state steps must not time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "meds_knn_reference_loaded 1.0" in httpx.get(f"{base_url}/metrics", timeout=5).text:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not load its kNN reference tier within {timeout}s")


@contextmanager
def thread_server(settings: Settings, **options: Any) -> Iterator[str]:
    """A real uvicorn server in a background thread of this process; yields its base URL. `options` go to
    `uvicorn.Config` (e.g. the `http` protocol class of `meds serve`)."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, thread=thread)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


class ProcessServer:
    """`meds serve` (or another `meds` command) in a subprocess, so tests can SIGKILL and restart it."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "MEDS_DATA_DIR": str(data_dir), **(env or {})}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        return [sys.executable, "-m", "meds_service.cli", "serve", "--port", str(self.port)]

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.proc = subprocess.Popen(
            self.args(),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: SIGKILL takes the refit workers down too
        )
        try:
            wait_ready(self.base_url, timeout, self.proc)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the service and its worker processes: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class ProcessWorker(ProcessServer):
    """`meds worker` in a subprocess (no HTTP: started when its process runs). Its metrics port is off unless
    the test sets one: tests run in parallel (pytest-xdist), and a fixed port would collide."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, {"MEDS_WORKER_METRICS_PORT": "0", **(env or {})})

    def args(self) -> list[str]:
        return [sys.executable, "-m", "meds_service.cli", "worker"]

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.proc = subprocess.Popen(
            self.args(), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"meds worker exited with {self.proc.returncode}")
