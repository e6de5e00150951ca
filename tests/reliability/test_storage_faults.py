"""Storage faults are 503 with Retry-After, the connection stays usable, nothing acknowledged is lost, and
writes resume once the fault passes: a full disk, a read-only filesystem, an I/O error, a locked database.

The full disk is a small tmpfs when this process may mount one (root), else SQLite's own max_page_count,
so the test runs everywhere. A read-only filesystem and an I/O error are injected at COMMIT as SQLite
fails it (a busy tmpfs cannot be remounted read-only); the lock is a real one, of another connection.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from harness.server import free_port, wait_ready
from meds_service.app import create_app
from meds_service.settings import Settings
from meds_service.storage.sqlite import SQLiteStore

DIM = 256


def can_mount(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 4 MiB tmpfs for the data folder, or None where none can be mounted."""
    folder = tmp_path / "disk"
    mounted = can_mount(folder)
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def live(make_settings: Callable[..., Settings], tmp_path: Path, disk: Path | None) -> Iterator[tuple[str, Any]]:
    """A real server in a thread (its data on the tmpfs when there is one) and its app."""
    app = create_app(make_settings(data_dir=(disk or tmp_path) / "data", refit_processes=False))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, thread=thread)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)


def batch(i: int, n: int = 40) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    return {
        "rollouts": [
            {
                "rollout_id": f"b{i}-r{r}",
                "prompt_id": f"p{r % 4}",
                "correct": False,
                "fingerprint": rng.standard_normal(DIM).astype(np.float32).tolist(),
            }
            for r in range(n)
        ]
    }


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "unavailable"


def acked_are_kept(client: httpx.Client, acked: list[int], stored: int) -> None:
    """Every acknowledged batch is stored once: the run holds exactly them, and each resend is a duplicate."""
    assert client.get("/v1/runs/f").json()["stats"]["rollouts"] == stored
    for i in acked:
        statuses = {r["status"] for r in client.post("/v1/runs/f/score", json=batch(i)).json()["results"]}
        assert statuses == {"duplicate"}


def test_a_full_disk_is_503_and_writes_resume(live: tuple[str, Any], disk: Path | None) -> None:
    base, app = live
    store: SQLiteStore = app.state.engine.store
    if disk is None:  # no tmpfs here: SQLite's own "database or disk is full", at the same size
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages + 4 * 1024 * 1024 // 4096}")
    acked: list[int] = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(400):
            response = client.post("/v1/runs/f/score", json=batch(i))
            if response.status_code != 200:
                break
            acked.append(i)
        else:
            pytest.fail("the disk never filled")
        assert_unavailable(response)
        assert "full" in response.json()["error"]["message"]
        # The same keep-alive connection answers the next requests.
        assert_unavailable(client.post("/v1/runs/f/score", json=batch(1000)))
        assert client.get("/healthz").status_code == 200
        acked_are_kept(client, acked, 40 * len(acked))
        if disk is not None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        else:
            store._db.execute("PRAGMA max_page_count=1073741823")
        assert client.post("/v1/runs/f/score", json=batch(1000)).status_code == 200
        acked_are_kept(client, [*acked, 1000], 40 * (len(acked) + 1))


class FailingCommit:
    """The store's connection, except that COMMIT fails as SQLite fails it (the transaction is gone)."""

    def __init__(self, db: sqlite3.Connection, message: str, code: int) -> None:
        self.db, self.message, self.code = db, message, code

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self.db.execute("ROLLBACK")
            error = sqlite3.OperationalError(self.message)
            error.sqlite_errorcode = self.code  # type: ignore[attr-defined]
            raise error
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize(
    ("fault", "message", "code"),
    [
        ("read-only", "attempt to write a readonly database", sqlite3.SQLITE_READONLY),
        ("io-error", "disk I/O error", sqlite3.SQLITE_IOERR),
        ("full", "database or disk is full", sqlite3.SQLITE_FULL),
    ],
)
def test_a_failing_commit_is_503_and_the_connection_stays_usable(
    live: tuple[str, Any], fault: str, message: str, code: int
) -> None:
    base, app = live
    store: SQLiteStore = app.state.engine.store
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.post("/v1/runs/f/score", json=batch(0)).status_code == 200
        real = store._db
        store._db = FailingCommit(real, message, code)  # type: ignore[assignment]
        try:
            for i in (1, 2):  # twice on one connection: the first failure left nothing broken behind
                response = client.post("/v1/runs/f/score", json=batch(i))
                assert_unavailable(response)
                assert message in response.json()["error"]["message"]
        finally:
            store._db = real
        assert client.post("/v1/runs/f/score", json=batch(3)).status_code == 200
        acked_are_kept(client, [0, 3], 80)
        assert {r["status"] for r in client.post("/v1/runs/f/score", json=batch(1)).json()["results"]} == {"scored"}


def test_a_locked_database_is_503(live: tuple[str, Any]) -> None:
    """Another process holds the database's write lock past the busy timeout."""
    base, app = live
    store: SQLiteStore = app.state.engine.store
    store._db.execute("PRAGMA busy_timeout=200")
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.post("/v1/runs/f/score", json=batch(0)).status_code == 200
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            response = client.post("/v1/runs/f/score", json=batch(1))
            assert_unavailable(response)
            assert "locked" in response.json()["error"]["message"]
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert client.post("/v1/runs/f/score", json=batch(1)).status_code == 200
        acked_are_kept(client, [0, 1], 80)
