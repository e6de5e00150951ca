"""Pure-ASGI middleware: request ids, body-size limit, request metrics and the access log (outermost first)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import RateLimited
from ..metrics import Metrics
from .errors import error_response

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Probes and scrapes arrive every few seconds; their successes are logged at DEBUG only.
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
_ERROR_BODY_LIMIT = 8192  # error bodies are small; never hold more of a response than this

log = logging.getLogger(__name__)
access_log = logging.getLogger("meds.access")
reject_log = logging.getLogger("meds.rejected")


def _error_of(body: bytes) -> tuple[str, str]:
    """(type, message) of an error body `{"error": {...}}`; what can be read of anything else."""
    try:
        error = orjson.loads(body)["error"]
        return str(error["type"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "http_error", body[:200].decode("utf-8", "replace")


class _TooLarge(Exception):
    pass


class RequestContext:
    """Gives each request an id (the client's X-Request-ID when sane), limits the body, counts metrics and
    writes one access line per request: method, route template, status, duration, rollouts, request id
    (never fingerprints or texts). A 4xx also gets a `meds.rejected` warning that says why, at most once
    per second per route, status and error type."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.rejections = RateLimited(1.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder: dict[str, Any] = {"status": 500, "started": False}
        error_body = bytearray()

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif 400 <= status_holder["status"] < 500 and len(error_body) < _ERROR_BODY_LIMIT:
                error_body.extend(message.get("body", b"")[: _ERROR_BODY_LIMIT - len(error_body)])
            await send(message)

        length = headers.get("content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise _TooLarge
            await self.app(scope, self._limited(receive), send_wrapped)
        except _TooLarge:
            if status_holder["started"]:
                raise
            response = error_response(
                413, "payload_too_large", f"body is over the limit of {self.max_body_bytes} bytes", request_id
            )
            await response(scope, receive, send_wrapped)
        except Exception:
            # Answered here, once, rather than by Starlette's outermost handler, which re-raises after its
            # response so that the server logs the same traceback a second time.
            if status_holder["started"]:
                raise  # too late for an answer: the server logs it and drops the connection
            log.exception("unhandled error on %s %s", scope.get("method", ""), scope.get("path", ""))
            response = error_response(500, "internal", "internal error (see the service log)", request_id)
            await response(scope, receive, send_wrapped)
        finally:
            route = scope.get("route")
            # A mount (the docs assets under /static) sets its prefix as root_path and no route.
            mounted = scope.get("root_path")
            path = getattr(route, "path", None) or (f"{mounted}/{{path}}" if mounted else "unmatched")
            status = str(status_holder["status"])
            method = scope.get("method", "")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(path, method, status).inc()
            self.metrics.latency.labels(path, method, status).observe(seconds)
            self._log(scope, method, path, status_holder["status"], seconds, request_id, bytes(error_body))

    def _log(
        self, scope: Scope, method: str, route: str, status: int, seconds: float, request_id: str, error_body: bytes
    ) -> None:
        fields: dict[str, Any] = {"method": method, "route": route, "status": status,
                                  "duration_ms": round(seconds * 1e3, 2)}  # fmt: skip
        rollouts = scope["state"].get("rollouts")
        if rollouts is not None:
            fields["rollouts"] = rollouts
        fields["request_id"] = request_id
        if 400 <= status < 500:
            type_, message = _error_of(error_body)
            fields["error"] = type_
            held = self.rejections.allow((route, status, type_))
            if held is not None:
                more = f" ({held} more like it held back)" if held else ""
                reject_log.warning(
                    "%s %s %d %s: %s%s", method, route, status, type_, message, more,
                    extra={"fields": {"route": route, "status": status, "error": type_, "request_id": request_id}},
                )  # fmt: skip
        quiet = route in _QUIET_ROUTES and status < 400
        access_log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d", method, route, status,
                       extra={"fields": fields})  # fmt: skip

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            return message

        return wrapped
