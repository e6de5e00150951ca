"""Scoped API keys end to end: a real server with a key file, the real client. A key outside its scope gets
one 403, which the client raises as `PermissionDeniedError` without retrying, also in degraded mode."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest

from meds_client import AuthenticationError, MedsClient, PermissionDeniedError, Rollout

ADMIN = "admin-" + "a" * 40
TEAM_A = "team-a-" + "b" * 40


def test_a_scoped_key_over_http(start_server: Callable[..., str], tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nkey_sha256 = "{hashlib.sha256(ADMIN.encode()).hexdigest()}"\nactions = ["admin"]\n\n'
        f'[[keys]]\nkey = "{TEAM_A}"\nruns = ["team-a-*"]\nactions = ["read", "score"]\n'
    )
    base = start_server(api_keys_file=keys, refit_processes=False)
    batch = [Rollout(f"r{i}", "p", correct=False, fingerprint=[0.0, 1.0, float(i)]) for i in range(3)]
    with MedsClient(base, api_key=ADMIN) as admin:
        admin.put_run("team-b-1", {"penalty_target": "wrong"})
    with MedsClient(base, api_key=TEAM_A, retries=3) as team_a:
        assert [r.status for r in team_a.score("team-a-1", batch)] == ["scored"] * 3
        assert [run.run for run in team_a.list_runs()] == ["team-a-1"]
        denied: list[Callable[[], object]] = [
            partial(team_a.score, "team-b-1", batch),
            partial(team_a.get_run, "team-b-1"),
            partial(team_a.put_run, "team-a-1", {"penalty_target": "none"}),  # read and score only
        ]
        for call in denied:
            requests = team_a.stats.requests
            with pytest.raises(PermissionDeniedError) as caught:
                call()
            assert caught.value.status_code == 403 and caught.value.error_type == "forbidden"
            assert TEAM_A not in str(caught.value)
            assert team_a.stats.requests == requests + 1 and team_a.stats.retries == 0
    with MedsClient(base, api_key=TEAM_A, on_error="zero") as degraded, pytest.raises(PermissionDeniedError):
        degraded.score("team-b-1", batch)
    with MedsClient(base, api_key="wrong-" + "c" * 40) as wrong, pytest.raises(AuthenticationError):
        wrong.list_runs()
    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.json() == {"status": "ready", "detail": {"store": "sqlite", "runs": 2}}
