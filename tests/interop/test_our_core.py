"""Our Core, `b24sync core` with HOLD_UNTIL_LEAD_ID on, in front of the original NestJS Bitrix
service (its stand-in) and in front of ours, against the emulator: changes made back to back
end in one lead with the final fields, and the user `synced`; their service's error replies end
`failed` with the reason, and a later change tries again."""

from __future__ import annotations

import json

import httpx
import pytest

from b24sync.settings import Settings
from tests.bitrix.conftest import Admin
from tests.core.rabbit import drain, publish_raw
from tests.interop.conftest import (
    HOLD_SETTING,
    StartOriginalBitrix,
    phones,
    user_in_state,
)
from tests.interop.original_bitrix import OriginalBitrixService

PHONE = "+77001112233"
NEW_PHONE = "+77009998877"


def test_the_hold_setting_is_cores() -> None:
    assert HOLD_SETTING.lower() in Settings.model_fields


async def create(api: httpx.AsyncClient, full_name: str = "Иван Иванов") -> int:
    response = await api.post("/users", json={"full_name": full_name, "phone": PHONE})
    assert response.status_code == 201, response.text
    user_id: int = response.json()["id"]
    return user_id


async def rename(api: httpx.AsyncClient, user_id: int, full_name: str) -> None:
    response = await api.patch(f"/users/{user_id}", json={"full_name": full_name})
    assert response.status_code == 200, response.text


async def create_update_and_move(api: httpx.AsyncClient) -> int:
    """The seed's three requests back to back, the update with a new phone."""
    user_id = await create(api)
    updated = await api.patch(
        f"/users/{user_id}",
        json={"full_name": "Иван Петров", "phone": NEW_PHONE, "stage": "IN_PROCESS"},
    )
    assert updated.status_code == 200, updated.text
    moved = await api.post(f"/users/{user_id}/move", json={"stage": "CONVERTED"})
    assert moved.status_code == 200, moved.text
    return user_id


# Each Bitrix service with the phones it leaves on the lead: the original writes PHONE as
# Bitrix24 takes it on an update, beside the old number; ours replaces it.
BITRIX_SERVICES = {
    "original": ("their_bitrix", [PHONE, NEW_PHONE]),
    "ours": ("our_bitrix", [NEW_PHONE]),
}


@pytest.fixture(params=list(BITRIX_SERVICES))
def final_phones(request: pytest.FixtureRequest) -> list[str]:
    """Runs a test with each Bitrix service; gives the phones it leaves on the lead."""
    service, phones_left = BITRIX_SERVICES[request.param]
    request.getfixturevalue(service)
    return phones_left


async def test_changes_back_to_back_end_in_one_lead_holding_the_final_user(
    our_core: httpx.AsyncClient, admin: Admin, final_phones: list[str]
) -> None:
    user_id = await create_update_and_move(our_core)

    user = await user_in_state(our_core, user_id, "synced")
    assert user["version"] == 3
    (lead,) = await admin.leads()
    assert user["bitrix_lead_id"] == int(lead["ID"])
    assert (lead["TITLE"], lead["NAME"], lead["LAST_NAME"]) == ("Иван Петров", "Иван", "Петров")
    assert phones(lead) == final_phones
    assert lead["STATUS_ID"] == "CONVERTED"


async def test_their_final_error_ends_failed_and_a_later_change_creates_the_lead(
    our_core: httpx.AsyncClient, their_bitrix: OriginalBitrixService, admin: Admin
) -> None:
    # Every create fails until the script is cleared: Core's own retries too.
    await admin.fail(
        "crm.lead.add", status=400, error="ERROR_CORE", description="Lead not saved", times=1000
    )
    user_id = await create(our_core)

    failed = await user_in_state(our_core, user_id, "failed")
    assert failed["sync"]["error"] == "crm.lead.add: ERROR_CORE: Lead not saved"
    assert failed["bitrix_lead_id"] is None
    assert await admin.leads() == []

    (await admin.http.delete("/admin/faults/script")).raise_for_status()
    await rename(our_core, user_id, "Иван Петров")
    user = await user_in_state(our_core, user_id, "synced")
    (lead,) = await admin.leads()
    assert user["bitrix_lead_id"] == int(lead["ID"])
    assert lead["TITLE"] == "Иван Петров"
    # When one of Core's retries created the lead first, the change reached their service as
    # an update, which adds the phone again beside the old entry.
    assert set(phones(lead)) == {PHONE}


@pytest.mark.usefixtures("portal")
async def test_their_missing_phone_reply_ends_failed_and_a_later_change_creates_the_lead(
    our_core: httpx.AsyncClient,
    start_their_bitrix: StartOriginalBitrix,
    admin: Admin,
    settings: Settings,
) -> None:
    user_id = await create(our_core)
    # Our Core never sends a user without a phone: the create loses it on the way, so that their
    # service answers with the seed's error reply, as it does for any user it finds without one.
    [created] = await drain(settings.rabbitmq_queue, 1)
    del created.body["data"]["user"]["phone"]
    await publish_raw(settings.rabbitmq_queue, json.dumps(created.body, ensure_ascii=False))
    await start_their_bitrix()

    failed = await user_in_state(our_core, user_id, "failed")
    assert failed["sync"]["error"] == "Missing phone number"
    assert await admin.leads() == []

    await rename(our_core, user_id, "Иван Петров")
    user = await user_in_state(our_core, user_id, "synced")
    (lead,) = await admin.leads()
    assert user["bitrix_lead_id"] == int(lead["ID"])
    assert (lead["TITLE"], phones(lead)) == ("Иван Петров", [PHONE])
