"""No route blocks the event loop: a run whose lock is held (a score waiting on a refit, say) delays no
other request, not even reads of that run's stats."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from harness.server import free_port, wait_ready
from meds_service.app import create_app
from meds_service.engine import ErrorMemory
from meds_service.settings import Settings

HELD_S = 3.0
PATHS = ["/healthz", "/readyz", "/v1/runs/busy", "/v1/runs/other", "/v1/runs", "/metrics"]


@pytest.fixture
def live(make_settings: Callable[..., Settings]) -> Iterator[tuple[str, ErrorMemory]]:
    """A real uvicorn server in a thread, and its engine (to hold a run's lock from the test)."""
    app = create_app(make_settings())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, thread=thread)
        yield base, app.state.engine
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_held_run_lock_delays_no_other_request(live: tuple[str, ErrorMemory]) -> None:
    base, engine = live
    body = {"rollouts": [{"rollout_id": "r0", "prompt_id": "p", "correct": False, "fingerprint": [1.0, 2.0]}]}
    for run in ("busy", "other"):
        assert httpx.post(f"{base}/v1/runs/{run}/score", json=body, timeout=30).status_code == 200
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine.coordination.run("busy").lock:
            locked.set()
            release.wait(HELD_S)

    clients = {path: httpx.Client(base_url=base, timeout=30) for path in PATHS}
    for client in clients.values():
        client.get("/healthz")  # connected before the clock starts

    def timed(path: str) -> tuple[int, float]:
        started = time.perf_counter()
        response = clients[path].get(path)
        return response.status_code, time.perf_counter() - started

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(5)
        with ThreadPoolExecutor(len(PATHS)) as pool:
            timings = dict(zip(PATHS, pool.map(timed, PATHS), strict=True))
        assert holder.is_alive()  # every answer came while the lock was still held
    finally:
        release.set()
        holder.join()
        for client in clients.values():
            client.close()
    for path, (status, seconds) in timings.items():
        assert status == 200, path
        assert seconds < 0.1 if path in ("/healthz", "/readyz") else seconds < 1.0, (path, seconds)


def test_a_busy_run_can_be_deleted_without_blocking_other_runs(live: tuple[str, ErrorMemory]) -> None:
    """Deleting waits for the run's lock, but not while holding the registry's: other runs answer."""
    base, engine = live
    body = {"rollouts": [{"rollout_id": "r0", "prompt_id": "p", "correct": False, "fingerprint": [1.0, 2.0]}]}
    for run in ("busy", "other"):
        assert httpx.post(f"{base}/v1/runs/{run}/score", json=body, timeout=30).status_code == 200
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine.coordination.run("busy").lock:
            locked.set()
            release.wait(HELD_S)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(5)
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(httpx.delete, f"{base}/v1/runs/busy", timeout=30)
            time.sleep(0.2)
            started = time.perf_counter()
            assert httpx.get(f"{base}/v1/runs/other", timeout=30).status_code == 200
            assert time.perf_counter() - started < 1.0
            assert not deleting.done()
            release.set()
            assert deleting.result().status_code == 204
    finally:
        release.set()
        holder.join()
    assert httpx.get(f"{base}/v1/runs/busy", timeout=30).status_code == 404
