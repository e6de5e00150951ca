"""Who may do what, per route (docs/architecture.md, "Authorisation").

Every route declares the one action it performs with `Access` (public routes declare `Access(None)`), so a
route cannot be added without saying who may call it. The keys and their scopes live in `keys.py`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from ..core.errors import Forbidden, Unauthorized
from .keys import OPEN, Action, ApiKey, KeyRing


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return token


def keyring_of(request: Request) -> KeyRing:
    return request.app.state.keys  # type: ignore[no-any-return]


class Access:
    """A route's declared scope, used as its dependency: the action it performs on the run named in its path
    (or, without `{run}` in the path, on runs in general: listing). `Access(None)` declares a public route.

    401 without a known key; 403 when the key may not perform the action on the run. Checked before the
    route looks anything up, so a 403 says nothing about whether the run exists."""

    def __init__(self, action: Action | None) -> None:
        self.action = action

    def __repr__(self) -> str:
        return f"Access({self.action!r})"

    async def __call__(self, request: Request) -> ApiKey:
        # On the event loop: a hash and a few digest comparisons cost less than a hop to the threadpool.
        keys = keyring_of(request)
        if self.action is None or keys.open:
            return OPEN
        key = keys.identify(bearer_token(request))
        if key is None:
            raise Unauthorized("API key not accepted")
        run = request.path_params.get("run")
        if run is None:
            if self.action not in key.actions:
                raise Forbidden(f"this API key may not {self.action} runs")
        elif not key.may(self.action, run):
            raise Forbidden(f"this API key may not {self.action} run {_shown(run)}")
        return key


def _shown(run: str, limit: int = 140) -> str:
    return repr(run if len(run) <= limit else run[:limit] + "...")


def access(action: Action | None) -> Any:
    """`Depends(Access(action))`, for a route's `dependencies=[...]`."""
    return Depends(Access(action))


PUBLIC = access(None)
ReadAccess = Annotated[ApiKey, Depends(Access("read"))]
