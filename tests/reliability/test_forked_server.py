"""The crash-loop test's server: a forked start that hangs (here: stopped by SIGSTOP before it could start) or
ends before it is ready (killed by SIGKILL) is forked again, and what became of it is kept for the report."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import forked_server
from tests.support.forked_server import ForkedServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("sent", "reported"), [(signal.SIGSTOP, "Process {pid}")])
def test_a_start_that_is_not_ready_is_forked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: signal.Signals, reported: str
) -> None:
    monkeypatch.setattr(forked_server, "HUNG_START_S", 10.0)
    server = ForkedServer(tmp_path / "data", tmp_path / "service.log", {"MEDS_REFIT_PROCESSES": "false"})
    asked = server._ask
    pids: list[int] = []

    def ask(command: dict[str, Any]) -> dict[str, Any]:
        reply = asked(command)
        if command["op"] == "start":
            pids.append(int(reply["pid"]))
            if len(pids) == 1:
                os.kill(pids[0], sent)  # the first start hangs, or ends
        return reply

    monkeypatch.setattr(server, "_ask", ask)
    try:
        server.start()
        assert httpx.get(f"{server.base_url}/readyz", timeout=10).status_code == 200
        assert len(pids) == 2 and server.pid == pids[1]
        assert len(server.failed_starts) == 1 and reported.format(pid=pids[0]) in server.failed_starts[0]
        server.terminate()
        assert server.wait() == 0  # the second start ran and stopped gracefully; the hung one was reaped
    finally:
        server.close()
