"""The original NestJS Core (its stand-in) in front of our Bitrix service, `b24sync bitrix`,
against the emulator on the standard plan: the seed's three messages, with no message_id and no
version, end in the right lead, and every reply gives their Core the lead id."""

from __future__ import annotations

from typing import Any

from tests.bitrix.conftest import Admin
from tests.conftest import eventually
from tests.interop.conftest import phones
from tests.interop.original_core import OriginalCore
from tests.processes import ServiceProcess

PHONE = "+77001112233"
NEW_PHONE = "+77009998877"


def user(user_id: int, full_name: str, phone: str, stage: str) -> dict[str, Any]:
    """A user as their Core puts it in an event: the seed's four fields."""
    return {"id": user_id, "full_name": full_name, "phone": phone, "stage": stage}


async def lead_ids_known(core: OriginalCore, count: int) -> None:
    async def known() -> bool:
        return len(core.lead_ids) == count

    await eventually(known, wait_s=60)


async def test_create_update_with_a_new_phone_and_move(
    their_core: OriginalCore, our_bitrix: ServiceProcess, admin: Admin
) -> None:
    await their_core.create(user(1, "Иван Иванов", PHONE, "NEW"))
    await lead_ids_known(their_core, 1)
    # Their Core sends an update or a move only once it knows the lead id.
    assert await their_core.update(user(1, "Иван Петров", NEW_PHONE, "IN_PROCESS"))
    assert await their_core.move(user(1, "Иван Петров", NEW_PHONE, "CONVERTED"))

    replies = [reply["data"] for reply in await their_core.replies(3)]
    assert [(r["status"], r["action"], r["user_id"]) for r in replies] == [
        ("success", "create_card", 1),
        ("success", "update_card", 1),
        ("success", "move_card", 1),
    ]
    (lead,) = await admin.leads()
    assert {r["bitrix_lead_id"] for r in replies} == {int(lead["ID"])}
    assert their_core.lead_ids == {1: int(lead["ID"])}
    assert (lead["TITLE"], lead["NAME"], lead["LAST_NAME"]) == ("Иван Петров", "Иван", "Петров")
    assert phones(lead) == [NEW_PHONE]  # replaced, not added beside the old one
    assert lead["STATUS_ID"] == "CONVERTED"


async def test_a_user_without_a_phone_gets_the_seeds_error_reply(
    their_core: OriginalCore, our_bitrix: ServiceProcess, admin: Admin
) -> None:
    await their_core.create({"id": 2, "full_name": "Пользователь без телефона", "stage": "NEW"})

    reply = (await their_core.reply())["data"]
    assert (reply["status"], reply["reason"]) == ("error", "Missing phone number")
    assert reply["user"]["id"] == 2
    assert their_core.errors == {2: "Missing phone number"}
    assert their_core.lead_ids == {}
    assert await admin.leads() == []


async def test_a_burst_of_100_users_on_the_standard_plan(
    their_core: OriginalCore, our_bitrix: ServiceProcess, admin: Admin
) -> None:
    ids = range(1, 101)
    for user_id in ids:
        await their_core.create(user(user_id, f"Имя{user_id} Фамилия{user_id}", PHONE, "NEW"))
    await lead_ids_known(their_core, len(ids))
    for user_id in ids:
        final = user(user_id, f"Новое{user_id} Имя{user_id}", f"+7701{user_id:07d}", "CONVERTED")
        assert await their_core.update({**final, "stage": "IN_PROCESS"})
        assert await their_core.move(final)

    replies = [reply["data"] for reply in await their_core.replies(3 * len(ids), wait_s=60)]
    assert {r["status"] for r in replies} == {"success"}
    leads = {int(lead["ID"]): lead for lead in await admin.leads()}
    assert len(leads) == len(ids)
    assert set(their_core.lead_ids) == set(ids)
    for user_id, lead_id in their_core.lead_ids.items():
        lead = leads[lead_id]
        assert lead["ORIGIN_ID"] == str(user_id)
        assert lead["TITLE"] == f"Новое{user_id} Имя{user_id}"
        assert phones(lead) == [f"+7701{user_id:07d}"]
        assert lead["STATUS_ID"] == "CONVERTED"
