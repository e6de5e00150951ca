"""The one place that maps the error tree to HTTP: status codes and the body `{"error": {...}}`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..core.errors import (
    Conflict,
    IdCollision,
    InvalidInput,
    MedsError,
    NotFound,
    PayloadTooLarge,
    SchemaError,
    StoreUnavailable,
    Unauthorized,
)

log = logging.getLogger(__name__)

STATUS: dict[type[MedsError], int] = {
    SchemaError: 422,
    InvalidInput: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    IdCollision: 409,
    PayloadTooLarge: 413,
    StoreUnavailable: 503,
}
Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")
_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
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


def describe(errors: Iterable[Mapping[str, Any]], count: int, limit: int = 5) -> str:
    """The one message of validation errors (pydantic's, FastAPI's): where and what, never the input
    values (NaN would break JSON)."""
    parts = []
    for item in list(errors)[:limit]:
        where = ".".join(str(p) for p in item.get("loc", ())) or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    if count > limit:
        parts.append(f"and {count - limit} more")
    return "; ".join(parts)


def validated(model: type[Model], body: bytes) -> Model:
    """A JSON body validated against a wire model: 400 when it is not JSON, 422 when it does not fit."""
    return _parsed(model.model_validate_json, body)


def json_object(body: bytes) -> dict[str, Any]:
    """A body that must be a JSON object (or empty: {})."""
    return _parsed(_OBJECT.validate_json, body) if body.strip() else {}


def _parsed(parse: Callable[[bytes], T], body: bytes) -> T:
    """The one place a JSON body is parsed: 400 when it is not JSON, 422 with `describe` when it does not fit."""
    try:
        return parse(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise InvalidInput("body is not valid JSON") from None
        raise SchemaError(describe(errors, exc.error_count())) from None


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
        errors = exc.errors()
        return error_response(422, SchemaError.type, describe(errors, len(errors)), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, type_, str(exc.detail), request_id_of(request), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error (see the service log)", request_id_of(request))


__all__ = ["describe", "error_response", "install", "json_object", "validated"]
