"""Fixtures of the client suite: every HTTP behaviour is tested on both the sync and the async client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from meds_client import AsyncMedsClient, MedsClient
from tests.client._fakes import FAST_RETRIES, FakeService, SyncView


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest, service: FakeService) -> Iterator[Callable[..., Any]]:
    """Build a client of the kind under test, talking to `service`; sleeps are recorded, not slept."""
    created: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("base_url", "http://meds.test")
        options.setdefault("retries", FAST_RETRIES)
        options.setdefault("wire", "json")  # the JSON form is what these tests read; columns have their own
        if request.param == "sync":
            client: Any = MedsClient(http_client=httpx.Client(transport=httpx.MockTransport(service)), **options)
            client.slept = []
            client._sleep = client.slept.append
            created.append(client)
            return client
        async_client = AsyncMedsClient(http_client=httpx.AsyncClient(transport=httpx.MockTransport(service)), **options)
        async_client.slept = []  # type: ignore[attr-defined]

        async def record(seconds: float) -> None:
            async_client.slept.append(seconds)  # type: ignore[attr-defined]

        async_client._sleep = record  # type: ignore[method-assign]
        view = SyncView(async_client)
        created.append(view)
        return view

    yield make
    for client in created:
        client.close_view() if isinstance(client, SyncView) else client.close()
