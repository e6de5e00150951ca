"""Slow, idle and surplus connections cannot starve the service: heads and bodies have deadlines, idle
keep-alive connections expire, and the connection and request caps shed load that clients absorb by
retrying. Real `meds serve` processes, raw sockets for the misbehaving clients, the SDK for the good one."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.server import ProcessServer, thread_server
from meds_client import MedsClient, Rollout
from meds_service.server import RESERVED_FDS, ConnectionLimits, bounded_protocol, raise_open_files_limit
from meds_service.settings import Settings

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 10.0  # long enough to hold MAX_CONNECTIONS uploads open on a loaded machine
KEEPALIVE_S = 2
MAX_CONNECTIONS = 300
SLOW_CONNECTIONS = 2000
# Deadlines are timers on a loop that a loaded 2-core machine may run late; the bound is deadline + this.
MARGIN_S = 8.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    _, open_files = raise_open_files_limit()  # this process holds the slow connections
    assert open_files >= SLOW_CONNECTIONS + 200, f"the test needs more open files than {open_files}"
    env = {
        "MEDS_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "MEDS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "MEDS_KEEPALIVE_S": str(KEEPALIVE_S),
        "MEDS_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "MEDS_MAX_REQUESTS": "1000",
        # Stalled uploads to one run must reach the connection layer, not the admission of score requests.
        "MEDS_MAX_INFLIGHT_PER_RUN": "1000",
        "MEDS_MAX_INFLIGHT_TOTAL": "1000",
        "MEDS_REFIT_PROCESSES": "false",
        "MEDS_REFIT_WORKERS": "1",
    }
    server = ProcessServer(tmp_path_factory.mktemp("connections") / "data", env=env)
    server.start()
    yield server
    server.stop()


def batch(step: int, size: int = 8) -> list[Rollout]:
    rng = np.random.default_rng(step)
    return [
        Rollout(f"s{step}-r{i}", f"p{i % 4}", correct=i % 2 == 0, fingerprint=rng.normal(size=8).astype(np.float32))
        for i in range(size)
    ]


class Watched:
    """Raw connections and the moment the server closed each (None while open)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.sent_at: dict[socket.socket, float] = {}
        self.closed_at: dict[socket.socket, float] = {}
        self.received: dict[socket.socket, bytes] = {}

    def add(self, sock: socket.socket, first_bytes: bytes) -> None:
        try:
            sock.sendall(first_bytes)
        except OSError:  # closed by the server already (pushed out at the cap)
            self.sent_at[sock] = self.closed_at[sock] = time.monotonic()
            return
        sock.setblocking(False)
        self.sent_at[sock] = time.monotonic()
        self.received[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ)

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:  # reset
                data = b""
            if data:
                self.received[sock] += data
            else:
                self.closed_at[sock] = time.monotonic()
                self.selector.unregister(sock)

    def open(self) -> int:
        return len(self.sent_at) - len(self.closed_at)

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.open() and time.monotonic() < deadline:
            self.poll(0.1)

    def close(self) -> None:
        for sock in self.sent_at:
            sock.close()
        self.selector.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_slow_connections(server: ProcessServer, count: int, watched: Watched) -> int:
    """Connections that each send one byte of a request head and stall; returns the most descriptors the
    server held meanwhile."""
    assert server.proc is not None
    most = 0
    for i in range(count):
        watched.add(connect(server.port), b"G")
        if i % 50 == 0:
            watched.poll(0)
            most = max(most, open_files(server.proc.pid))
    return most


def test_slow_connections_are_closed_and_do_not_starve_clients(server: ProcessServer) -> None:
    watched = Watched()
    flood_done = threading.Event()
    errors: list[BaseException] = []
    most_open_files = 0

    def flood() -> None:
        nonlocal most_open_files
        try:
            most_open_files = open_slow_connections(server, SLOW_CONNECTIONS, watched)
            watched.wait_closed(HEADER_TIMEOUT_S + MARGIN_S)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            flood_done.set()

    scored = 0
    health: list[int] = []
    with MedsClient(server.base_url) as client:
        client.score("slow", batch(0))  # warm: the run exists, the client holds a connection
        flooder = threading.Thread(target=flood)
        started = time.monotonic()
        flooder.start()
        try:
            while not flood_done.is_set():
                results = client.score("slow", batch(scored + 1))
                assert [r.status for r in results] and all(r.status == "scored" for r in results)
                scored += 1
                health.append(httpx.get(f"{server.base_url}/healthz", timeout=30).status_code)
        finally:
            flooder.join(60)
            watched.close()
        elapsed = time.monotonic() - started
        retries = client.stats.retries
    assert not errors, errors
    assert len(watched.sent_at) == SLOW_CONNECTIONS
    # The cap held: the server's descriptors are its connections plus its own files (a few dozen).
    assert most_open_files <= MAX_CONNECTIONS + RESERVED_FDS
    assert watched.open() == 0, f"{watched.open()} slow connections still open"
    held = [watched.closed_at[s] - watched.sent_at[s] for s in watched.sent_at]
    assert max(held) <= HEADER_TIMEOUT_S + MARGIN_S
    # Pushed out at the cap: closed unanswered; past the head deadline: told so.
    assert {said[:12] for said in watched.received.values()} <= {b"", b"HTTP/1.1 408"}
    assert scored >= 1 and set(health) == {200}
    print(
        f"{SLOW_CONNECTIONS} slow connections, cap {MAX_CONNECTIONS}: {scored} batches scored in {elapsed:.1f} s "
        f"({retries} retries), slowest held {max(held):.1f} s, server held at most {most_open_files} descriptors"
    )


def http_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: meds\r\n\r\n".encode()


def read_response(sock: socket.socket) -> bytes:
    """One response with a content-length (what the service's JSON endpoints send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head


def wait_eof(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent first."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return time.monotonic() - started, data


def test_idle_keep_alive_connections_expire(server: ProcessServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(http_get("/healthz"))
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(KEEPALIVE_S / 4)
        sock.sendall(http_get("/healthz"))  # still open: keep-alive works
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        waited, sent = wait_eof(sock, KEEPALIVE_S + MARGIN_S)
    assert sent == b""
    assert waited <= KEEPALIVE_S + MARGIN_S


def trickle(sock: socket.socket, pieces: list[bytes], timeout: float) -> tuple[float, bytes]:
    """Send `pieces` one every 0.25 s until the server closes; seconds it took and what the server said."""
    sock.setblocking(False)
    started = time.monotonic()
    data = b""
    i = 0
    while time.monotonic() - started < timeout:
        try:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        except BlockingIOError:
            pass
        except ConnectionResetError:
            break
        with contextlib.suppress(OSError):
            sock.send(pieces[min(i, len(pieces) - 1)])
        i += 1
        time.sleep(0.25)
    return time.monotonic() - started, data


def test_a_trickled_head_gets_408_within_the_head_deadline(server: ProcessServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        took, said = trickle(sock, [b"x-a: b\r\n"], HEADER_TIMEOUT_S + MARGIN_S)
    assert said.startswith(b"HTTP/1.1 408"), said
    assert took <= HEADER_TIMEOUT_S + MARGIN_S


def test_a_trickled_body_gets_408_within_the_body_deadline(server: ProcessServer) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"POST /v1/runs/trickle/score HTTP/1.1\r\nhost: meds\r\ncontent-type: application/json\r\n")
        sock.sendall(b"content-length: 100000\r\n\r\n{")
        took, said = trickle(sock, [b" "], BODY_TIMEOUT_S + MARGIN_S)
    assert said.startswith(b"HTTP/1.1 408"), said
    assert took <= BODY_TIMEOUT_S + MARGIN_S
    assert httpx.get(f"{server.base_url}/healthz", timeout=30).status_code == 200


def stalled_upload(port: int) -> socket.socket:
    """A connection whose request is in progress: its head is in, its body never comes. `Expect:
    100-continue` makes the server say when the request reached the app, so the test knows it counts."""
    sock = connect(port)
    sock.sendall(
        b"POST /v1/runs/stalled/score HTTP/1.1\r\nhost: meds\r\ncontent-type: application/json\r\n"
        b"expect: 100-continue\r\ncontent-length: 1000\r\n\r\n"
    )
    return sock


def wait_continue(sock: socket.socket) -> None:
    sock.settimeout(30)
    assert sock.recv(4096).startswith(b"HTTP/1.1 100")


def test_past_the_connection_cap_a_new_connection_is_closed_at_once_and_the_service_recovers(
    server: ProcessServer,
) -> None:
    uploads = [stalled_upload(server.port) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in uploads:
            wait_continue(sock)
        # Every connection has a request in progress: none can make room, the new one is closed unanswered.
        with connect(server.port) as sock:
            sock.sendall(http_get("/healthz"))
            _, said = wait_eof(sock, 30)
        assert said == b""
    finally:
        for sock in uploads:
            sock.close()
    with MedsClient(server.base_url) as client:
        results = client.score("after-cap", batch(0))
    assert all(r.status == "scored" for r in results)


def test_past_the_request_cap_the_answer_is_503_with_retry_after_and_the_client_retries(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", refit_processes=False, refit_workers=1)
    limits = ConnectionLimits(header_timeout_s=10, body_timeout_s=60, max_connections=100, max_requests=3)
    with thread_server(settings, http=bounded_protocol(limits), ws="none") as base:
        port = int(base.rsplit(":", 1)[1])
        uploads = [stalled_upload(port) for _ in range(limits.max_requests)]

        def end_uploads() -> None:
            for sock in uploads:
                sock.close()

        try:
            for sock in uploads:
                wait_continue(sock)
            refused = httpx.post(f"{base}/v1/runs/r/score", json={"rollouts": []}, timeout=30)
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "unavailable"
            assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # probes are not refused

            # The client retries by itself; the uploads end while it waits.
            threading.Timer(0.5, end_uploads).start()
            with MedsClient(base) as client:
                results = client.score("r", batch(0))
                assert client.stats.retries >= 1
            assert all(r.status == "scored" for r in results)
        finally:
            end_uploads()
