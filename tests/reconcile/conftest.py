"""The drift check against the emulator over HTTP, Core's database and the shared Redis: the
fixtures of the Core and Bitrix suites."""

from __future__ import annotations

from typing import Any

from b24sync.bitrix.batch import query_string
from tests.bitrix.conftest import (
    Admin,
    admin,
    fast_settings,
    portal,
    redis_client,
    start_service,
)
from tests.core.conftest import committed, core_settings, database_url, engine

__all__ = [
    "admin",
    "committed",
    "core_settings",
    "database_url",
    "engine",
    "fast_settings",
    "portal",
    "redis_client",
    "start_service",
]


async def add_leads(admin: Admin, leads: list[dict[str, Any]]) -> list[int]:
    """Leads added as someone working in the portal would, 50 to a `batch` request."""
    ids: list[int] = []
    for at in range(0, len(leads), 50):
        chunk = leads[at : at + 50]
        commands = {
            f"a{n}": f"crm.lead.add?{query_string({'fields': fields})}"
            for n, fields in enumerate(chunk)
        }
        answer = await admin.rest("batch", {"halt": 1, "cmd": commands})
        ids.extend(int(answer["result"][f"a{n}"]) for n in range(len(chunk)))
    return ids
