"""The one place that maps the error tree to HTTP: status codes and the body `{"error": {...}}`."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..core.errors import (
    Conflict,
    InvalidInput,
    MedsError,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    Unauthorized,
)
from .codec import SchemaError, describe

log = logging.getLogger(__name__)

STATUS: dict[type[MedsError], int] = {
    SchemaError: 422,
    InvalidInput: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    StoreUnavailable: 503,
}
_HTTP_TYPES = {
    400: "invalid_input",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    503: "unavailable",
}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    status: int, type_: str, message: str, request_id: str | None, headers: Mapping[str, str] | None = None
) -> Response:
    body = orjson.dumps({"error": {"type": type_, "message": message, "request_id": request_id}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def status_of(exc: MedsError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def install(app: FastAPI) -> None:
    @app.exception_handler(MedsError)
    async def _meds(request: Request, exc: MedsError) -> Response:
        status = status_of(exc)
        headers = None
        if isinstance(exc, StoreUnavailable):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            log.warning("store unavailable: %s", exc.message, exc_info=exc)
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(status, exc.type, exc.message, request_id_of(request), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for item in exc.errors()[:5]:
            where = ".".join(str(p) for p in item.get("loc", ())) or "request"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        return error_response(422, "invalid_input", "; ".join(parts), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, type_, str(exc.detail), request_id_of(request), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error (see the service log)", request_id_of(request))


__all__ = ["describe", "error_response", "install"]
