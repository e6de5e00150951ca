"""Every error the client raises, in one tree.

```
MedsError                          anything raised by meds_client
├── APIConnectionError             the service could not be reached (DNS, refused, reset, protocol)
│   └── APITimeoutError            a connect, read, write or pool timeout expired
├── APIResponseValidationError     the service answered 2xx with a body the client cannot read
└── APIStatusError                 the service answered with an error status
    ├── BadRequestError            400: bad input (NaN, wrong dimension, empty batch, ...)
    │   └── UnprocessableEntityError   422: the body failed schema validation
    ├── AuthenticationError        401: missing or wrong API key
    ├── PermissionDeniedError      403: the API key may not do this to this run (its scope)
    ├── NotFoundError              404: unknown run (reads, delete)
    ├── ConflictError              409 `conflict`: a config change that would alter a run with memory
    ├── IdCollisionError           409 `id_collision`: two ids of a run share a stored hash; rename one
    ├── PayloadTooLargeError       413: the request body is over the service's limit
    ├── RateLimitError             429: too many requests
    └── InternalServerError        5xx: the service failed
        └── ServiceUnavailableError    503: store unreachable or overloaded (sent with Retry-After)
```

Every `APIStatusError` carries `status_code`, `error_type` (the service's `error.type`), `request_id`
(from the error body, else the `X-Request-ID` header) and `body` (the parsed JSON, or the text when it is
not JSON). The class follows the service's error type where one status carries several meanings (409),
else the status code.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "IdCollisionError",
    "InternalServerError",
    "MedsError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
]


class MedsError(Exception):
    """Base class of every error raised by meds_client."""


class APIConnectionError(MedsError):
    """The request never got an HTTP answer (after all retries)."""

    def __init__(self, message: str, *, request: httpx.Request) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (after all retries)."""


class APIResponseValidationError(MedsError):
    """A successful response whose body does not have the documented shape."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")


class APIStatusError(MedsError):
    """The service answered with a 4xx or 5xx status."""

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: Any,
        request_id: str | None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        self.request_id = request_id
        self.error_type = error_type

    def __str__(self) -> str:
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{self.status_code} {super().__str__()}{suffix}"


class BadRequestError(APIStatusError):
    """400: the request was rejected as bad input; resending it will not help."""


class UnprocessableEntityError(BadRequestError):
    """422: the body failed validation; resending it will not help."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong (set MEDS_API_KEY or pass api_key=)."""


class PermissionDeniedError(APIStatusError):
    """403: the API key is valid but its scope does not cover this action on this run; not retried."""


class NotFoundError(APIStatusError):
    """404: the run (or route) does not exist."""


class ConflictError(APIStatusError):
    """409: the config change would alter results of a run that already has memory."""


class IdCollisionError(APIStatusError):
    """409 `id_collision`: two prompt ids (or rollout ids) of the run share the hash the store keys them by.

    Nothing of the request was stored. Renaming one id resolves it; in degraded mode (`on_error="zero"`)
    the affected rollouts get penalty 0 like any other failure."""


class PayloadTooLargeError(APIStatusError):
    """413: the body is over the service's size limit; lower max_batch_rollouts."""


class RateLimitError(APIStatusError):
    """429: too many requests; retried with backoff before this is raised."""


class InternalServerError(APIStatusError):
    """5xx: the service failed; retried with backoff before this is raised."""


class ServiceUnavailableError(InternalServerError):
    """503: the store is unreachable or the service is overloaded; retried before this is raised."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


_TYPE_ERRORS: dict[str, type[APIStatusError]] = {
    "conflict": ConflictError,
    "id_collision": IdCollisionError,
}


def status_error_class(status_code: int, error_type: str | None = None) -> type[APIStatusError]:
    """The most specific exception class for an error status and the service's error type."""
    if error_type in _TYPE_ERRORS:
        return _TYPE_ERRORS[error_type]
    if status_code in _STATUS_ERRORS:
        return _STATUS_ERRORS[status_code]
    return InternalServerError if status_code >= 500 else APIStatusError


def make_status_error(response: httpx.Response) -> APIStatusError:
    """Build the exception for an error response, reading the `{"error": {...}}` body when there is one."""
    body = _read_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or response.reason_phrase or "error")
    error_type = error.get("type")
    error_type = str(error_type) if error_type else None
    if error_type:
        message = f"{error_type}: {message}"
    request_id = error.get("request_id") or response.headers.get("x-request-id")
    cls = status_error_class(response.status_code, error_type)
    request_id = str(request_id) if request_id else None
    return cls(message, response=response, body=body, request_id=request_id, error_type=error_type)


def _read_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
