"""GET /users?search= and GET /users/{id}/history on the real database, each test rolled back."""

from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.settings import Settings
from tests.core.helpers import answer, error, publish_all, success


async def test_search_by_part_of_the_name_or_the_phone(client: httpx.AsyncClient) -> None:
    people = [
        ("Иван Иванов", "+77001112233"),
        ("Пётр Петров", "+77005556677"),
        ("Anna 100%_Smith", "+77009998811"),
    ]
    for name, phone in people:
        assert (await client.post("/users", json={"full_name": name, "phone": phone})).is_success

    async def names(**query: str) -> list[str]:
        response = await client.get("/users", params=query)
        assert response.status_code == 200
        return [user["full_name"] for user in response.json()["items"]]

    assert await names(search="иван") == ["Иван Иванов"]
    assert await names(search="555 66") == ["Пётр Петров"]
    assert await names(search="+7700") == [name for name, _ in people]
    # LIKE's wildcards are taken as they are.
    assert await names(search="100%_") == ["Anna 100%_Smith"]
    assert await names(search="%") == ["Anna 100%_Smith"]
    assert await names(search="nobody") == []
    assert await names(search="Петров", sync_status="pending") == ["Пётр Петров"]
    assert await names(search="Петров", sync_status="failed") == []
    assert (await client.get("/users", params={"search": ""})).status_code == 422


async def test_history_lists_each_change_with_its_answer(
    client: httpx.AsyncClient,
    rollback_sessionmaker: async_sessionmaker[AsyncSession],
    core_settings: Settings,
) -> None:
    sessions = rollback_sessionmaker
    created = await client.post(
        "/users", json={"full_name": "Иван Иванов", "phone": "+77001112233"}
    )
    user_id = created.json()["id"]
    await publish_all(sessions)
    await answer(sessions, core_settings, success(user_id, 1, lead=77))
    await client.post(f"/users/{user_id}/move", json={"stage": "IN_PROCESS"})
    await publish_all(sessions)
    await answer(
        sessions,
        core_settings,
        error(user_id, 2, reason="crm.lead.update: bad stage", action="move_card"),
    )

    response = await client.get(f"/users/{user_id}/history")

    assert response.status_code == 200
    history = response.json()
    assert history["user_id"] == user_id
    moved, created_event = history["events"]
    assert moved["pattern"] == "user_moved"
    assert moved["version"] == 2
    assert moved["changed"] == ["stage"]
    assert moved["sent"] == {
        "full_name": "Иван Иванов",
        "phone": "+77001112233",
        "stage": "IN_PROCESS",
    }
    assert moved["published_at"] is not None
    assert moved["answer_status"] == "error"
    assert moved["answer_reason"] == "crm.lead.update: bad stage"
    assert created_event["pattern"] == "user_created"
    assert created_event["changed"] == ["full_name", "phone", "stage"]
    assert created_event["answer_status"] == "success"
    assert (await client.get(f"/users/{user_id}/history", params={"limit": 1})).json()[
        "events"
    ] == [moved]
    assert (await client.get("/users/999999/history")).status_code == 404
