"""SIGKILL the service mid-run: after a restart on the same data nothing acknowledged is lost, and the run
continues with exactly the penalties of an uninterrupted one."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness.reference import ReferenceMEDS, assert_matches_reference
from harness.server import ProcessServer
from tests.support.trace import TraceSpec, to_wire, trace_steps

pytestmark = pytest.mark.slow


def send_ignoring_errors(url: str, body: object) -> None:
    """A request that the kill interrupts: its fate (committed or not) is what the retry must cope with."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=body, timeout=60)


def test_sigkill_between_steps_and_mid_request(tmp_path: Path) -> None:
    spec = TraceSpec(prompts=32, epochs=5, prompts_per_step=8, seed=11)
    steps = list(trace_steps(spec))
    reference = ReferenceMEDS()
    server = ProcessServer(tmp_path / "data", env={"MEDS_REFIT_INTERVAL_S": "0.05"})
    server.start()
    acked_vectors = 0
    try:
        kill_after = {5, 11}  # right after an acknowledged step, refits of it likely still pending
        kill_during = {8, 15}  # while a request is in flight: it may or may not have been committed
        i = 0
        while i < len(steps):
            step = steps[i]
            body = to_wire(step)
            expected = reference.step(step)
            if i in kill_during:
                url = f"{server.base_url}/v1/runs/k/score"
                sender = threading.Thread(target=send_ignoring_errors, args=(url, body))
                sender.start()
                time.sleep(0.02)
                server.kill()
                sender.join(60)
                server.start()
                # The retry resends the same ids: committed rollouts come back as duplicates with their
                # first results, the rest are scored now; either way the values are the reference's.
                response = httpx.post(f"{server.base_url}/v1/runs/k/score", json=body, timeout=60)
                assert response.status_code == 200
                results = response.json()["results"]
                assert {r["status"] for r in results} <= {"scored", "skipped", "duplicate"}
            else:
                response = httpx.post(f"{server.base_url}/v1/runs/k/score", json=body, timeout=60)
                assert response.status_code == 200
                results = response.json()["results"]
            assert_matches_reference(results, expected)
            acked_vectors += sum(1 for r in step if r.fingerprint is not None)
            if i in kill_after:
                before = httpx.get(f"{server.base_url}/v1/runs/k").json()["stats"]
                server.kill()
                server.start()
                after = httpx.get(f"{server.base_url}/v1/runs/k").json()["stats"]
                assert after["vectors"] == before["vectors"] == acked_vectors
                assert after["keys"] == before["keys"] and after["rollouts"] == before["rollouts"]
                # Pending refits survive too (they are derived from the stored fit ranges).
                assert after["pending_refits"] >= 0
            i += 1
        final = httpx.get(f"{server.base_url}/v1/runs/k").json()["stats"]
        assert final["vectors"] == acked_vectors
    finally:
        server.stop()


def test_labels_and_pending_refits_survive_sigkill(tmp_path: Path) -> None:
    """Kill with refits pending (background refits off, so that they stay pending until asked for)."""
    server = ProcessServer(tmp_path / "data", env={"MEDS_REFIT_BACKGROUND": "false", "MEDS_REFIT_WORKERS": "1"})
    server.start()
    try:
        steps = list(trace_steps(TraceSpec(prompts=8, epochs=2, prompts_per_step=8, seed=5)))
        httpx.post(f"{server.base_url}/v1/runs/p/score", json=to_wire(steps[0]), timeout=60).raise_for_status()
        before = httpx.get(f"{server.base_url}/v1/runs/p").json()["stats"]
        server.kill()
        server.start()
        after = httpx.get(f"{server.base_url}/v1/runs/p").json()["stats"]
        assert after["pending_refits"] == before["pending_refits"] > 0
        httpx.post(f"{server.base_url}/v1/runs/p/recluster", timeout=60).raise_for_status()
        view = httpx.get(f"{server.base_url}/v1/runs/p/prompts/prompt-0").json()["groups"]["wrong"]
        server.kill()
        server.start()
        assert httpx.get(f"{server.base_url}/v1/runs/p/prompts/prompt-0").json()["groups"]["wrong"] == view
        assert httpx.get(f"{server.base_url}/v1/runs/p").json()["stats"]["pending_refits"] == 0
    finally:
        server.stop()
