"""The `meds` command: `meds serve` runs the API (and its refit workers) on one machine."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meds", description="MEDS reward-shaping service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API (settings from MEDS_* environment variables)")
    serve.add_argument("--host", help="bind address (MEDS_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MEDS_PORT, default 8000)")
    serve.add_argument("--data-dir", help="embedded store folder (MEDS_DATA_DIR, default ./meds-data)")
    commands.add_parser("worker", help="refit worker: consume refit jobs from the Redis queue (needs MEDS_REDIS_URL)")
    args = parser.parse_args(argv)

    given = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
             "data_dir": getattr(args, "data_dir", None)}  # fmt: skip
    overrides = {k: v for k, v in given.items() if v}
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"meds: bad settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from .app import create_app

        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=30,
        )
        return 0
    if not settings.redis_url:
        print("meds worker: refit workers share a Redis store; set MEDS_REDIS_URL", file=sys.stderr)
        return 2
    from .workers import run_worker

    return run_worker(settings)


if __name__ == "__main__":
    raise SystemExit(main())
