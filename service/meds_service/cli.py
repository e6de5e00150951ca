"""The `meds` command: `meds serve` runs the API (and its refit workers) on one machine; `meds worker` refits.

A start that cannot succeed ends with one line on stderr that says what to change, and an exit code of
its own (no traceback):

    2  bad settings or arguments
    3  the store cannot be opened (the data folder belongs to another process, Redis is unreachable, ...)
    4  the address or port is taken
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from . import logs
from .core.errors import MedsError
from .server import ConnectionLimits, bounded_protocol, connection_cap, raise_open_files_limit
from .settings import Settings, settings_error

EXIT_SETTINGS = 2
EXIT_STORE = 3
EXIT_ADDRESS = 4

log = logging.getLogger("meds")


class StartupFailed(Exception):
    """A start that cannot succeed: `str()` is the one line to print, `code` the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _store_fix(settings: Settings) -> str:
    if settings.redis_url:
        return "check that Redis answers at MEDS_REDIS_URL"
    return (
        f"each `meds serve` needs its own data folder: stop the other one, or give this one another folder "
        f"with --data-dir or MEDS_DATA_DIR (now {settings.data_dir})"
    )


def _store_failure(exc: MedsError, settings: Settings) -> StartupFailed:
    return StartupFailed(f"meds: cannot open the store: {exc.message}; {_store_fix(settings)}", EXIT_STORE)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """Raise the open-files limit as far as allowed, and keep the connection cap below it."""
    before, after = raise_open_files_limit()
    cap = connection_cap(settings.max_connections, after, settings.refit_workers)
    log.info(
        "open files limit %d (soft limit was %d): at most %d connections, %d requests in progress",
        after,
        before,
        cap,
        settings.max_requests,
        extra={"fields": {"open_files": after, "max_connections": cap, "max_requests": settings.max_requests}},
    )
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=cap,
        max_requests=settings.max_requests,
    )


def serve(settings: Settings) -> None:
    """Run the API until SIGTERM/SIGINT. The app's start-up (opening the store, loading memory) runs here,
    outside uvicorn, so that a failure is reported as a `StartupFailed` rather than uvicorn's traceback."""
    from .app import MetricsPortUnavailable, create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # logs.configure() already routes uvicorn's loggers
        access_log=False,  # the middleware writes the access log (route templates, request ids)
        lifespan="off",  # run below, around the server
        timeout_graceful_shutdown=30,
        ws="none",
        timeout_keep_alive=settings.keepalive_s,
        # Head and body deadlines, the connection cap and the cap on requests in progress. uvicorn's own
        # limit_concurrency stays off: it counts connections still waiting for a head as busy.
        http=bounded_protocol(connection_limits(settings)),
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        try:
            async with app.router.lifespan_context(app):
                try:
                    await server.serve()
                except SystemExit:  # uvicorn exits like this when it cannot bind
                    if server.started:
                        raise
                    raise StartupFailed(
                        f"meds: cannot listen on {settings.host}:{settings.port}; choose another with --port or "
                        f"MEDS_PORT (and --host or MEDS_HOST)",
                        EXIT_ADDRESS,
                    ) from None
        except MedsError as exc:
            raise _store_failure(exc, settings) from None
        except MetricsPortUnavailable as exc:
            raise StartupFailed(
                f"meds: cannot serve metrics on port {settings.metrics_port}: {exc.strerror}; choose another with "
                f"MEDS_METRICS_PORT, or leave it unset to serve /metrics on MEDS_PORT",
                EXIT_ADDRESS,
            ) from None

    # The event loop uvicorn itself would pick (uvloop when installed).
    with _stop_on_signals(server), asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())


@contextmanager
def _stop_on_signals(server: uvicorn.Server) -> Iterator[None]:
    """SIGTERM/SIGINT stop the server gracefully, also while the memory is still loading. uvicorn re-raises
    the signal it handled once it has stopped; it lands here too, so the store is still closed properly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, frame: FrameType | None) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker(settings: Settings) -> int:
    if not settings.redis_url:
        raise StartupFailed("meds worker: refit workers share a Redis store; set MEDS_REDIS_URL", EXIT_SETTINGS)
    from .workers import run_worker

    try:
        return run_worker(settings)
    except MedsError as exc:
        raise _store_failure(exc, settings) from None
    except OSError as exc:  # the metrics port
        raise StartupFailed(
            f"meds worker: cannot serve metrics on port {settings.worker_metrics_port}: {exc.strerror}; "
            f"choose another with MEDS_WORKER_METRICS_PORT (0 = none)",
            EXIT_ADDRESS,
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meds", description="MEDS reward-shaping service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP API (settings from MEDS_* environment variables)")
    serve_cmd.add_argument("--host", help="bind address (MEDS_HOST, default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port (MEDS_PORT, default 8000)")
    serve_cmd.add_argument("--data-dir", help="embedded store folder (MEDS_DATA_DIR, default ./meds-data)")
    worker_cmd = commands.add_parser(
        "worker", help="refit worker: consume refit jobs from the Redis queue (needs MEDS_REDIS_URL)"
    )
    for command in (serve_cmd, worker_cmd):
        command.add_argument("--log-format", choices=["json", "text"], help="MEDS_LOG_FORMAT, default json")
        command.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="MEDS_LOG_LEVEL")
    args = parser.parse_args(argv)

    given: dict[str, Any] = {
        name: getattr(args, name, None) for name in ("host", "port", "data_dir", "log_format", "log_level")
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"meds: bad settings: {settings_error(exc)}", file=sys.stderr)
        return EXIT_SETTINGS
    logs.configure(settings.log_level, settings.log_format)
    try:
        if args.command == "serve":
            serve(settings)
            return 0
        return worker(settings)
    except StartupFailed as exc:
        log.critical("%s", exc, extra={"fields": {"exit_code": exc.code}})
        return exc.code


if __name__ == "__main__":
    raise SystemExit(main())
