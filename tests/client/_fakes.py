"""Test doubles of the client suite: a scripted fake MEDS service for httpx.MockTransport, and a
blocking view of the async client so that one test body drives both clients."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import numpy as np

from meds_client import AsyncMedsClient, RetryPolicy
from meds_client._encoding import encode_matrix

Responder = Callable[[httpx.Request], httpx.Response]


def decode_matrix(wire: dict[str, Any]) -> np.ndarray:
    """Inverse of the client's `encode_matrix`: the float32 matrix a request carried."""
    assert wire["dtype"] == "float32"
    rows, cols = (int(n) for n in wire["shape"])
    return np.frombuffer(base64.b64decode(wire["data"]), dtype="<f4").reshape(rows, cols).astype(np.float32)


class FakeService:
    """Answers like the MEDS API; `script` queues responses (or exceptions) that are used first."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.script: list[httpx.Response | Exception | Responder] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step(request) if callable(step) else step
        return self.default(request)

    def bodies(self) -> list[dict[str, Any]]:
        """Request bodies in the JSON form (columnar msgpack bodies are converted to it)."""
        return [read_body(r) for r in self.requests if r.content]

    @staticmethod
    def default(request: httpx.Request) -> httpx.Response:
        headers = {"X-Request-ID": "req-default"}
        if request.url.path.endswith("/score"):
            return httpx.Response(
                200,
                json={"results": [score_result(r) for r in read_body(request)["rollouts"]]},
                headers=headers,
            )
        return httpx.Response(200, json={"status": "ok"}, headers=headers)


def read_body(request: httpx.Request) -> dict[str, Any]:
    """A request body as JSON, the columnar msgpack form rewritten as the equivalent JSON body."""
    if request.headers.get("content-type") != "application/msgpack":
        body: dict[str, Any] = json.loads(request.content)
        return body
    wire = msgpack.unpackb(request.content)
    n = len(wire["rollout_id"])
    correct = np.frombuffer(wire["correct"], "<i1")
    reward = np.frombuffer(wire["reward"], "<f8")
    present = np.frombuffer(wire.get("fingerprint_present", b"\x00" * n), "<u1").astype(bool)
    rows = np.cumsum(present) - 1
    rollouts = [
        {"rollout_id": wire["rollout_id"][i], "prompt_id": wire["prompt_id"][i],
         "correct": None if correct[i] < 0 else bool(correct[i]),
         "reward": None if np.isnan(reward[i]) else float(reward[i]),
         "fingerprint_row": int(rows[i]) if present[i] else None}
        for i in range(n)
    ]  # fmt: skip
    converted: dict[str, Any] = {"rollouts": rollouts}
    if "fingerprints" in wire:
        converted["fingerprint_matrix"] = encode_matrix(
            np.frombuffer(wire["fingerprints"]["data"], "<f4").reshape(wire["fingerprints"]["shape"])
        )
    if "step" in wire:
        converted["step"] = wire["step"]
    return converted


def score_result(rollout: dict[str, Any]) -> dict[str, Any]:
    """A deterministic verdict: wrong rollouts with a fingerprint get 0.1, others 0."""
    has_fingerprint = rollout.get("fingerprint") is not None or rollout.get("fingerprint_row") is not None
    wrong = rollout["correct"] is False and has_fingerprint
    return {
        "rollout_id": rollout["rollout_id"],
        "status": "scored" if has_fingerprint else "skipped",
        "cluster": 0 if wrong else None,
        "cluster_size": 1 if wrong else 0,
        "penalty": 0.1 if wrong else 0.0,
        "shaped_reward": None,
    }


def error_response(
    status: int, *, request_id: str | None = "req-1", headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"error": {"type": "some_error", "message": f"failed with {status}", "request_id": request_id}}
    return httpx.Response(status, json=body, headers=headers or {})


class SyncView:
    """Calls an AsyncMedsClient's coroutine methods as if they were blocking, all on one event loop
    (so that pooled connections stay on the loop that opened them)."""

    def __init__(self, client: AsyncMedsClient) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        def run(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(attribute(*args, **kwargs))

        return run

    def close_view(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


FAST_RETRIES = RetryPolicy(max_retries=3, initial_delay=0.0, jitter=0.0)
