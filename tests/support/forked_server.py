"""`meds serve` in processes forked from one that has already imported the service, for tests that kill and
restart it many times: a restart then costs the app's own start-up (open the store, load the memory), not
the imports of the scientific stack (10 s and more each on a loaded 2-core machine).

`ForkedServer` (in the test process) talks to a *zygote*, `python -m tests.support.forked_server`, over its
stdin and stdout, one JSON object per line: `{"op": "start", "env": {...}}` forks a child that runs
`meds.cli.main(["serve", ...])` in a session of its own and answers its pid; `{"op": "wait"}` answers how
that child ended once it has. The child is the real service process: a SIGKILL ends it as it would end
`meds serve`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

import httpx

from harness.server import READY_TIMEOUT_S, free_port

# The zygote forks: keep the numeric libraries from starting thread pools in it before that.
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A restart takes seconds, 30 s at most on a loaded CI machine: one not ready after this has hung.
HUNG_START_S = 90.0


class ForkedServer:
    """A `meds serve` that can be started again and again on one port and data folder, each start with
    extra environment variables of its own."""

    def __init__(self, data_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        root = Path(__file__).resolve().parents[2]
        with open(log, "ab") as stderr:  # what a child writes before its own redirection lands in the log too
            self.zygote = subprocess.Popen(
                [sys.executable, "-m", "tests.support.forked_server"],
                cwd=root,
                env={**os.environ, **SINGLE_THREADED, "MEDS_DATA_DIR": str(data_dir), **(env or {})},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.pid: int | None = None
        self.failed_starts: list[str] = []  # what became of each start that was not ready, and was forked again

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.zygote.stdin is not None and self.zygote.stdout is not None
        self.zygote.stdin.write(json.dumps(command) + "\n")
        self.zygote.stdin.flush()
        line = self.zygote.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited with {self.zygote.wait()}")
        return dict(json.loads(line))

    def start(self, env: dict[str, str] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Fork a service with these extra variables and wait until it is ready.

        A forked service has, rarely and only on a busy machine, never become ready: it ended (or hung) before
        its first log line. Such a start is killed after `HUNG_START_S` and forked once more, and what became of
        it (its exit status, or its threads) is kept in `failed_starts` for the test to report. A second
        failure in a row fails the start.
        """
        for attempt in range(2):
            self.pid = int(self._ask({"op": "start", "port": self.port, "log": str(self.log), "env": env or {}})["pid"])
            failure = self._ready(min(timeout, HUNG_START_S) if attempt == 0 else timeout)
            if failure is None:
                return
            if attempt == 1:
                raise TimeoutError(f"{self.base_url} not ready (log: {self.log}): {failure}")
            self.failed_starts.append(failure)
            for kill in (os.killpg, os.kill):  # its session, and itself should it have hung before setsid()
                with contextlib.suppress(ProcessLookupError):
                    kill(self.pid, signal.SIGKILL)
            self._ask({"op": "wait"})

    def _ready(self, timeout: float) -> str | None:
        """None once the service answers /readyz or has ended (`wait` then says how); else its threads."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            if not self._ask({"op": "poll"})["running"]:
                # It may have served requests and died by its fault point between two polls: `wait` reports it.
                return None
            time.sleep(0.05)
        return f"not ready after {timeout:.0f} s; its threads:\n{_stacks(self.pid or 0)}"

    def wait(self) -> int:
        """Block until the service ends: the number of the signal that killed it, 0 if it exited."""
        return int(self._ask({"op": "wait"})["signal"])

    def terminate(self) -> None:
        """SIGTERM the service's session (a graceful stop); `wait` then answers."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)

    def close(self) -> None:
        """Stop the zygote (its stdin closes) and anything of the last service still running."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.zygote.stdin is not None:
            self.zygote.stdin.close()
        try:
            self.zygote.wait(30)
        except subprocess.TimeoutExpired:
            self.zygote.kill()
            self.zygote.wait(30)
        if self.zygote.stdout is not None:
            self.zygote.stdout.close()


def _stacks(pid: int) -> str:
    """Where a service that never became ready is stuck (py-spy's dump of its threads), for `failed_starts`: a
    restart in the crash-loop test has, rarely, not become ready; once seen, it had ended rather than hung."""
    spy = Path(sys.executable).with_name("py-spy")
    try:
        command = [str(spy), "dump", "--native", "--pid", str(pid)]
        dump = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no stack dump ({exc})"
    return f"{dump.stdout}{dump.stderr}"


def _serve(command: dict[str, Any]) -> None:
    """In the forked child: become the service; never returns."""
    code = 1
    try:
        os.setsid()  # a session of its own, like ProcessServer's: a kill of the group takes its workers too
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(command["env"])
        from meds_service import cli

        code = cli.main(["serve", "--port", str(command["port"])])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _zygote(commands: IO[str], replies: IO[str]) -> None:
    from meds_service import app, cli  # noqa: F401  (the slow imports, once: every child inherits them)
    from meds_service.core.knn import load_reference

    load_reference()  # what each child would import in the background, once

    child, ended = 0, None  # the last child, and how it ended once reaped
    for line in commands:
        command = json.loads(line)
        if command["op"] == "start":
            replies.flush()
            child, ended = os.fork(), None
            if child == 0:
                _serve(command)
            reply: dict[str, Any] = {"pid": child}
        else:  # "wait" blocks until the child ends, "poll" answers at once
            if ended is None:
                pid, status = os.waitpid(child, 0 if command["op"] == "wait" else os.WNOHANG)
                if pid:
                    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
                    ended = {"signal": 0 if code is not None else os.WTERMSIG(status), "code": code}
            reply = {"running": True} if ended is None else {"running": False, **ended}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _zygote(sys.stdin, sys.stdout)
