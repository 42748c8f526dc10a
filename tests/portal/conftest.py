"""The emulator under test, served over real HTTP in the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from b24sync.portal.main import PortalServer
from b24sync.settings import Settings

StartPortal = Callable[..., Awaitable[PortalServer]]
MakeApi = Callable[..., Awaitable["Api"]]


class Api:
    """A thin client: REST calls through the webhook URL, admin calls through the base URL."""

    def __init__(self, http: httpx.AsyncClient, server: PortalServer) -> None:
        self.http = http
        self.server = server
        self.webhook_url = server.settings.portal_webhook_url

    async def call(self, method: str, params: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.post(f"{self.webhook_url}/{method}", json=params or {})

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        response = await self.call(method, params)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    async def admin(self, verb: str, path: str, body: Any = None) -> Any:
        response = await self.http.request(verb, f"{self.server.base_url}{path}", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def add_lead(self, **fields: Any) -> int:
        lead_id = await self.result("crm.lead.add", {"fields": fields})
        assert isinstance(lead_id, int)
        return lead_id


@pytest.fixture
async def start_portal(settings: Settings) -> AsyncIterator[StartPortal]:
    """Starts an emulator with settings overrides; every one started is stopped after the test."""
    started: list[PortalServer] = []

    async def start(**overrides: Any) -> PortalServer:
        server = PortalServer(settings.model_copy(update=overrides))
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


@pytest.fixture
async def make_api(start_portal: StartPortal, http: httpx.AsyncClient) -> MakeApi:
    async def make(**overrides: Any) -> Api:
        return Api(http, await start_portal(**overrides))

    return make


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    """An emulator without a request limit, for tests of the methods themselves."""
    return await make_api(portal_rate_limit="off")
