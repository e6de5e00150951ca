"""The one place that maps the error tree to HTTP: status codes and the body `{"error": {...}}`."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from ..core.errors import (
    Conflict,
    Forbidden,
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
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

STATUS: dict[type[MedsError], int] = {
    SchemaError: 422,
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
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
    403: "forbidden",
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
    """A JSON body validated against a wire model: 400 when it is not JSON or repeats a key, 422 when it
    does not fit."""
    value = _parsed(model.model_validate_json, body)
    _check_unique_keys(body, _keys_in(value))
    return value


def json_object(body: bytes) -> dict[str, Any]:
    """A body that must be a JSON object (or empty: {})."""
    if not body.strip():
        return {}
    value = _parsed(_OBJECT.validate_json, body)
    _check_unique_keys(body, _keys_in(value))
    return value


# A JSON string, and whether it is an object's key (a colon follows). Matched from the left over valid JSON,
# whose every '"' opens or closes a string, it finds exactly the strings of the document.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"(\s*:)?')
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _keys_in(value: Any) -> int:
    """How many object members a parsed body holds. Walked a level at a time, so that the thousands of
    rollouts and fingerprint floats of a score request are counted by C loops, not a Python call each."""
    keys, level = 0, [value]
    while level:
        kinds: set[type[Any]] = set(map(type, level))
        if kinds <= _SCALARS:
            return keys
        below: list[Any] = []
        for kind in kinds - _SCALARS:
            items: list[Any] = level if len(kinds) == 1 else [v for v in level if type(v) is kind]
            if issubclass(kind, BaseModel):
                for model in items:
                    fields = model.model_fields_set
                    keys += len(fields)
                    below.extend(getattr(model, name) for name in fields)
            elif issubclass(kind, dict):
                keys += sum(map(len, items))
                below.extend(itertools.chain.from_iterable(map(dict.values, items)))
            elif issubclass(kind, list):
                below.extend(itertools.chain.from_iterable(items))
        level = below
    return keys


def _check_unique_keys(body: bytes, parsed_keys: int) -> None:
    """400 when an object of the body repeats a key (JSON parsers keep the last value silently): the body
    names more keys than its parsed objects hold. Exact: every key is followed by a colon, and outside strings
    a colon follows nothing else, so as many colons as parsed keys proves every key distinct at the cost of one
    byte count; only bodies with colons inside strings (or a repeat) pay the regex pass over their strings."""
    if body.count(b":") == parsed_keys:
        return
    named = sum(1 for match in _STRING.finditer(body) if match.group(1))
    if named != parsed_keys:
        raise InvalidInput(f"body repeats a key in an object{_first_repeat(body)}")


def _first_repeat(body: bytes) -> str:
    """The first repeated key, for the message (the body is known to have one; it is parsed again only now)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if not found and len(set(keys)) != len(keys):
            found.append(next(k for i, k in enumerate(keys) if k in keys[:i]))
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except ValueError:
        return ""
    return f": {found[0]!r}" if found else ""


def _parsed(parse: Callable[[bytes], T], body: bytes) -> T:
    """The one place a JSON body is parsed: 400 when it is not JSON, 422 with `describe` when it does not fit."""
    try:
        return parse(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise InvalidInput("body is not valid JSON") from None
        raise SchemaError(describe(errors, exc.error_count())) from None


def allowed_methods(request: Request) -> str:
    """Every method some route serves at the request's path (the router names only the first route's), and
    OPTIONS, which each path answers."""
    routes = request.app.router.routes
    methods = {"OPTIONS"}
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in routes):
            methods.add(method)
    return ", ".join(sorted(methods))


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
        headers = exc.headers
        if exc.status_code == 405:
            allowed = allowed_methods(request)
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allowed})
            headers = {**(headers or {}), "Allow": allowed}
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, type_, str(exc.detail), request_id_of(request), headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away before its body was in (or the server closed it at the body deadline): no one
        # reads this answer; the access log and metrics count it as 499, as nginx does.
        message = "the connection closed before the request body was received"
        return error_response(499, "client_closed_request", message, request_id_of(request))


__all__ = ["describe", "error_response", "install", "json_object", "validated"]
