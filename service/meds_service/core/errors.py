"""The one error tree of the service.

    MedsError                   type sent to clients
    ├── InvalidInput            invalid_input       bad request content (400)
    │   └── SchemaError         invalid_input       the body does not match the request schema (422)
    ├── Unauthorized            unauthorized        missing or wrong API key (401)
    ├── Forbidden               forbidden           the key may not do this action on this run (403)
    ├── NotFound                not_found           unknown run or prompt (404)
    ├── Conflict                conflict            config change that would alter a run with memory (409)
    ├── IdCollision             id_collision        two ids of one run share a stored hash: rename one (409)
    ├── PayloadTooLarge         payload_too_large   body over the configured limit (413)
    └── StoreUnavailable        unavailable         the store cannot be reached or is overloaded (503)

One meaning per type: a client can act on the type alone (the client's exception tree mirrors it).

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


class SchemaError(InvalidInput):
    """The body does not match the request schema (answered with 422)."""


class Unauthorized(MedsError):
    type = "unauthorized"


class Forbidden(MedsError):
    """A known API key without the scope for the request: the message names the action and run, never the key."""

    type = "forbidden"


class NotFound(MedsError):
    type = "not_found"


class Conflict(MedsError):
    type = "conflict"


class IdCollision(MedsError):
    """Two different prompt ids (or rollout ids of one prompt) of a run share the hash a store keys them by.

    Nothing of the batch was stored; renaming one id resolves it. Not a `Conflict`: no config is involved."""

    type = "id_collision"


class PayloadTooLarge(MedsError):
    type = "payload_too_large"


class StoreUnavailable(MedsError):
    type = "unavailable"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
