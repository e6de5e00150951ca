"""Service logs: one JSON object per line (default) or human-readable text, for meds and uvicorn alike.

`configure()` installs one stderr handler on the root logger and routes uvicorn's loggers through it, so
every line of `meds serve` and `meds worker` has the same shape. Fields passed as `extra={"fields": {...}}`
become keys of the JSON object (or `key=value` pairs in text). Libraries that announce harmless things at
INFO (FAISS's loader tries AVX512 and AVX2 builds and logs each miss) are raised to WARNING.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

LogFormat = Literal["json", "text"]
# Loggers that report library internals at INFO; their warnings and errors still show.
QUIET_AT_INFO = ("faiss", "faiss.loader", "numba", "asyncio", "multipart", "httpx", "httpcore")
# uvicorn's own loggers: they keep their levels but lose their handlers and write through the root's.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...fields, "exc"}`: one line, parseable by any log shipper."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`2026-01-01 12:00:00,000 INFO meds.access: POST /v1/runs/{run}/score 200 key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


def configure(level: str = "info", fmt: LogFormat = "json") -> None:
    """Send every log line to stderr in one format; call once per process, before anything logs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # the configured level, whatever an earlier configuration left
    if logging.getLevelName(level.upper()) <= logging.INFO:
        for name in QUIET_AT_INFO:
            logging.getLogger(name).setLevel(logging.WARNING)


class RateLimited:
    """Lets a line through at most once per `interval_s` per cause, and says how many were held back."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[Any, ...], float] = {}
        self._held: dict[tuple[Any, ...], int] = {}
        self._lock = threading.Lock()

    def allow(self, cause: tuple[Any, ...]) -> int | None:
        """None to drop this occurrence; else how many occurrences of the cause were dropped since the last."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(cause)
            if last is not None and now - last < self.interval_s:
                self._held[cause] = self._held.get(cause, 0) + 1
                return None
            if len(self._last) > 4096:  # causes are bounded in practice; never let a flood of them grow this
                self._last.clear()
                self._held.clear()
            self._last[cause] = now
            return self._held.pop(cause, 0)
