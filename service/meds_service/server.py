"""The connection layer of `meds serve`: uvicorn's httptools protocol with deadlines and caps.

uvicorn on its own closes only idle keep-alive connections; a client that opens a connection and sends a
request head slowly (or never) holds a file descriptor for as long as it likes, and enough of them starve
`/healthz` and score requests alike. `BoundedHttpProtocol` adds, per connection:

- a head deadline: the request head must be complete `header_timeout_s` after the connection opens, or
  after the first byte of a later request on a kept-alive connection (408 then close, or just close when
  nothing arrived);
- a body deadline: the body must be complete `body_timeout_s` after its head (408 then close);

and, per server (`ConnectionGate`):

- a connection cap: past it, a new connection takes the place of the oldest connection without a request
  in progress (waiting for a head, or idle between requests); when every connection has a request in
  progress, the new one is closed at once. A flood of slow connections therefore only ever pushes out
  itself, while a client that sends its head at once gets in;
- a cap on requests in progress (uvicorn's tasks): past it the answer is 503 with `Retry-After`, except
  for the probes (`/healthz`, `/readyz`), so that a busy replica is not restarted for being busy.

`raise_open_files_limit` lifts the soft RLIMIT_NOFILE to the hard limit; `connection_cap` keeps the cap
below it with room for the store, the refit workers' pipes and the log files.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .logs import RateLimited

log = logging.getLogger("meds.connections")

# File descriptors kept free of client connections: the store (SQLite files and their WAL, or Redis
# sockets), the log, the listening socket, FAISS and Python's own; and a few per refit worker process.
RESERVED_FDS = 128
RESERVED_FDS_PER_WORKER = 4
# Paths answered even past the cap on requests in progress: cheap, and what orchestrators probe.
PROBE_PATHS = frozenset({b"/healthz", b"/readyz"})
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines (seconds) and caps of one server's connections."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_requests: int


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns (before, after). Where the hard limit
    is unlimited, or the system refuses, the soft limit stays what it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def connection_cap(max_connections: int, open_files: int, refit_workers: int) -> int:
    """The connection cap in effect: `max_connections`, lowered to leave the reserved descriptors free (at
    most half of a small limit)."""
    if open_files == resource.RLIM_INFINITY:
        return max_connections
    reserved = min(RESERVED_FDS + RESERVED_FDS_PER_WORKER * refit_workers, open_files // 2)
    return max(1, min(max_connections, open_files - reserved))


class ConnectionGate:
    """What all connections of one server share: who is open, who has no request in progress (oldest
    first: the first to make room for a new connection), and how many were refused or pushed out."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[BoundedHttpProtocol] = set()
        self.idle: OrderedDict[BoundedHttpProtocol, None] = OrderedDict()
        self.refused = 0
        self.evicted = 0
        self._warnings = RateLimited(5.0)

    def admit(self, connection: BoundedHttpProtocol) -> bool:
        """Take a new connection, pushing out the oldest idle one at the cap; False: close it at once."""
        if len(self.open) >= self.limits.max_connections:
            if not self.idle:
                self.refused += 1
                self._warn("refused", "every connection has a request in progress")
                return False
            oldest, _ = self.idle.popitem(last=False)
            self.evicted += 1
            self._warn("evicted", "closed the oldest connection without a request in progress")
            self.leave(oldest)
            oldest.transport.close()
        self.open.add(connection)
        self.idle[connection] = None
        return True

    def busy(self, connection: BoundedHttpProtocol) -> None:
        self.idle.pop(connection, None)

    def waiting(self, connection: BoundedHttpProtocol) -> None:
        """The connection has no request in progress: it is the newest to be pushed out at the cap."""
        if connection in self.open:
            self.idle[connection] = None
            self.idle.move_to_end(connection)

    def leave(self, connection: BoundedHttpProtocol) -> None:
        self.open.discard(connection)
        self.idle.pop(connection, None)

    def _warn(self, cause: str, what: str) -> None:
        held = self._warnings.allow((cause,))
        if held is not None:
            log.warning(
                "connection cap of %d reached: %s (%d more like this not logged); MEDS_MAX_CONNECTIONS sets it",
                self.limits.max_connections,
                what,
                held,
                extra={"fields": {"refused": self.refused, "evicted": self.evicted}},
            )


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The answer past the cap on requests in progress, in the service's error format."""
    request_id = uuid.uuid4().hex
    message = "too many requests in progress on this server; retry after the delay in Retry-After"
    body = orjson.dumps({"error": {"type": "unavailable", "message": message, "request_id": request_id}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_TIMEOUT_BODY = b"request not received in time\n"
_TIMEOUT_RESPONSE = b"".join(
    [
        STATUS_LINE[408],
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n",
        b"connection: close\r\n\r\n",
        _TIMEOUT_BODY,
    ]
)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the deadlines and caps of its server's `gate` (see the module)."""

    gate: ClassVar[ConnectionGate]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        self._head_started = False

    # -- connection lifecycle -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.gate.admit(self):
            transport.close()
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.leave(self)
        self._cancel_deadlines()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.timeout_keep_alive_task is not None:
            # The first bytes after an idle spell: the next head is due within the head deadline (uvicorn
            # drops its keep-alive timer on any data, even a lone byte).
            self._arm_head_deadline()
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle now, not serving a pipelined request
            self.gate.waiting(self)

    # -- parser callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._cancel(self._head_deadline)
        self._head_deadline = None
        self._head_started = False
        self.gate.busy(self)
        path = self.url.partition(b"?")[0]
        busy = len(self.tasks) >= self.gate.limits.max_requests and path not in PROBE_PATHS
        self.app = _overloaded if busy else self.config.loaded_app
        super().on_headers_complete()
        self._cancel(self._body_deadline)
        self._body_deadline = self.loop.call_later(self.gate.limits.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._cancel(self._body_deadline)
        self._body_deadline = None
        super().on_message_complete()

    # -- deadlines ------------------------------------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.gate.limits.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        # Part of a head arrived: say why the connection ends. Nothing at all: just close it.
        self._close(answer=self._head_started)

    def _body_timed_out(self) -> None:
        self._body_deadline = None
        self._close(answer=self.cycle is not None and not self.cycle.response_started)

    def _close(self, answer: bool) -> None:
        if self.transport.is_closing():
            return
        if answer:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()

    def _cancel_deadlines(self) -> None:
        for handle in (self._head_deadline, self._body_deadline):
            self._cancel(handle)
        self._head_deadline = self._body_deadline = None

    @staticmethod
    def _cancel(handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()


def bounded_protocol(limits: ConnectionLimits) -> type[BoundedHttpProtocol]:
    """A protocol class for one server, pass it as `uvicorn.Config(http=...)`: its connections share one
    `ConnectionGate` (the class attribute `gate`)."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"gate": ConnectionGate(limits)})
