"""The one error tree of the service.

    MedsError
    ├── InvalidInput        bad request content (400/422)
    ├── Unauthorized        missing or wrong API key (401)
    ├── NotFound            unknown run or prompt (404)
    ├── Conflict            config change that would alter a run with memory (409)
    ├── PayloadTooLarge     body over the configured limit (413)
    └── StoreUnavailable    the store cannot be reached or is overloaded (503)

Adapters translate library exceptions (sqlite3, redis, faiss) into this tree at their boundary; the API maps
it to status codes in one place (`api/errors.py`).
"""

from __future__ import annotations


class MedsError(Exception):
    """Base class: `type` is the machine-readable error type sent to clients."""

    type = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(MedsError, ValueError):
    """Also a ValueError, so that validators (pydantic) report it as a validation error."""

    type = "invalid_input"


class Unauthorized(MedsError):
    type = "unauthorized"


class NotFound(MedsError):
    type = "not_found"


class Conflict(MedsError):
    type = "conflict"


class PayloadTooLarge(MedsError):
    type = "payload_too_large"


class StoreUnavailable(MedsError):
    type = "unavailable"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
