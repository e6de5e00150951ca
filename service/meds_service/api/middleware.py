"""Pure-ASGI middleware: request ids, body-size limit, and request metrics (outermost first)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import Metrics
from .errors import error_response

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _TooLarge(Exception):
    pass


class RequestContext:
    """Gives each request an id (the client's X-Request-ID when sane), limits the body, counts metrics."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

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

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
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
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            status = str(status_holder["status"])
            method = scope.get("method", "")
            self.metrics.requests.labels(path, method, status).inc()
            self.metrics.latency.labels(path, method, status).observe(time.perf_counter() - started)

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
