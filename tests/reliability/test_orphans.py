"""No orphans: when `meds serve` dies, however it dies, its forkserver, refit workers and resource tracker
exit too (they watch the service's pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.server import free_port, wait_ready


def alive_in_session(sid: int) -> list[tuple[int, str]]:
    """Processes of a session that are not zombies: (pid, command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "meds_service.cli", *command],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its children stay in its session: found by it after it is gone
    )


def kill_and_expect_no_orphans(proc: subprocess.Popen[bytes], workers: int) -> None:
    try:
        children = [p for p in alive_in_session(proc.pid) if p[0] != proc.pid]
        assert len(children) >= workers + 1, children  # the workers and the forkserver at least
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30  # seconds when idle; a loaded CI machine schedules the exits late
        while alive_in_session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive_in_session(proc.pid) == []
    finally:
        for pid, _ in alive_in_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_sigkilled_service_leaves_no_child_running(tmp_path: Path) -> None:
    port = free_port()
    proc = start(["serve", "--port", str(port)], {"MEDS_DATA_DIR": str(tmp_path / "data"), "MEDS_REFIT_WORKERS": "2"})
    try:
        wait_ready(f"http://127.0.0.1:{port}", 90, proc)
    except BaseException:
        proc.kill()
        raise
    kill_and_expect_no_orphans(proc, 2)


@pytest.mark.redis
def test_sigkilled_worker_leaves_no_child_running(tmp_path: Path, redis_url: str) -> None:
    env = {"MEDS_DATA_DIR": str(tmp_path / "data"), "MEDS_REDIS_URL": redis_url, "MEDS_REFIT_WORKERS": "2"}
    proc = start(["worker"], env)
    deadline = time.monotonic() + 60
    while len(alive_in_session(proc.pid)) < 4 and time.monotonic() < deadline:  # itself, forkserver, 2 workers
        assert proc.poll() is None, "meds worker exited"
        time.sleep(0.2)
    kill_and_expect_no_orphans(proc, 2)
