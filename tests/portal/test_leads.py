"""crm.lead.* and friends, shape by shape, against the facts of a real portal."""

from __future__ import annotations

import time

from tests.portal.conftest import Api

PHONE = "+77001112233"


async def test_add_returns_an_int_id_and_a_time_object(api: Api) -> None:
    response = await api.call(
        "crm.lead.add",
        {"fields": {"TITLE": "Ivan", "PHONE": [{"VALUE": PHONE}]}, "params": {"X": "Y"}},
    )
    body = response.json()
    assert response.status_code == 200
    assert isinstance(body["result"], int)
    assert body["result"] > 0
    timing = body["time"]
    assert set(timing) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating",
        "operating_reset_at",
    }
    assert timing["start"] <= timing["finish"] <= time.time()
    assert timing["date_start"].startswith(time.strftime("%Y-", time.gmtime()))
    assert isinstance(timing["operating_reset_at"], int)


async def test_get_returns_string_values_and_portal_defaults(api: Api) -> None:
    lead_id = await api.add_lead(
        NAME="Ivan",
        ORIGINATOR_ID="b24sync",
        ORIGIN_ID=123,
        PHONE=[{"VALUE": f"  {PHONE} ", "VALUE_TYPE": "MOBILE"}],
    )
    lead = await api.result("crm.lead.get", {"id": lead_id})
    assert lead["ID"] == str(lead_id)
    assert lead["NAME"] == "Ivan"
    assert lead["ORIGIN_ID"] == "123"
    assert lead["ORIGINATOR_ID"] == "b24sync"
    assert lead["STATUS_ID"] == "NEW"
    assert lead["ASSIGNED_BY_ID"] == "1"
    assert lead["OPENED"] == "Y"
    assert lead["HAS_PHONE"] == "Y"
    assert lead["DATE_CREATE"] == lead["DATE_MODIFY"]
    assert lead["PHONE"] == [
        {"ID": lead["PHONE"][0]["ID"], "VALUE_TYPE": "MOBILE", "VALUE": PHONE, "TYPE_ID": "PHONE"}
    ]
    assert lead["PHONE"][0]["ID"].isdigit()


async def test_get_unknown_id_is_not_found_and_a_bad_id_is_invalid(api: Api) -> None:
    missing = await api.call("crm.lead.get", {"id": 999})
    assert missing.status_code == 400
    assert missing.json() == {"error": "", "error_description": "Not found"}
    for params in ({}, {"id": "abc"}, {"id": 0}):
        invalid = await api.call("crm.lead.get", params)
        assert invalid.status_code == 400
        assert invalid.json()["error_description"] == "ID is not defined or invalid."


async def test_update_accepts_id_or_ID_and_drops_unknown_fields(api: Api) -> None:
    lead_id = await api.add_lead(NAME="Ivan")
    assert await api.result("crm.lead.update", {"id": lead_id, "fields": {"NAME": "Petr"}}) is True
    assert (
        await api.result(
            "crm.lead.update",
            {"ID": str(lead_id), "fields": {"STATUS_ID": "CONVERTED", "NO_SUCH_FIELD": "x"}},
        )
        is True
    )
    lead = await api.result("crm.lead.get", {"id": lead_id})
    assert lead["NAME"] == "Petr"
    assert lead["STATUS_ID"] == "CONVERTED"
    assert lead["STATUS_SEMANTIC_ID"] == "S"
    assert "NO_SUCH_FIELD" not in lead
    missing = await api.call("crm.lead.update", {"id": 999, "fields": {"NAME": "x"}})
    assert missing.status_code == 400
    assert missing.json()["error_description"] == "Not found"


async def test_update_of_phones_appends_replaces_and_deletes(api: Api) -> None:
    lead_id = await api.add_lead(PHONE=[{"VALUE": PHONE, "VALUE_TYPE": "WORK"}])
    first_id = (await api.result("crm.lead.get", {"id": lead_id}))["PHONE"][0]["ID"]

    await api.result("crm.lead.update", {"id": lead_id, "fields": {"PHONE": [{"VALUE": "+1"}]}})
    phones = (await api.result("crm.lead.get", {"id": lead_id}))["PHONE"]
    assert [phone["VALUE"] for phone in phones] == [PHONE, "+1"]
    second_id = phones[1]["ID"]

    replace = {"ID": first_id, "VALUE": "+2", "VALUE_TYPE": "HOME"}
    await api.result("crm.lead.update", {"id": lead_id, "fields": {"PHONE": [replace]}})
    phones = (await api.result("crm.lead.get", {"id": lead_id}))["PHONE"]
    assert [(p["ID"], p["VALUE"], p["VALUE_TYPE"]) for p in phones] == [
        (first_id, "+2", "HOME"),
        (second_id, "+1", "WORK"),
    ]

    delete = [{"ID": int(first_id), "DELETE": "Y"}, {"ID": second_id, "VALUE": ""}]
    await api.result("crm.lead.update", {"id": lead_id, "fields": {"PHONE": delete}})
    lead = await api.result("crm.lead.get", {"id": lead_id})
    assert "PHONE" not in lead
    assert lead["HAS_PHONE"] == "N"


async def test_delete_removes_the_lead(api: Api) -> None:
    lead_id = await api.add_lead(NAME="Ivan")
    assert await api.result("crm.lead.delete", {"id": lead_id}) is True
    assert (await api.call("crm.lead.get", {"id": lead_id})).status_code == 400
    again = await api.call("crm.lead.delete", {"id": lead_id})
    assert again.json()["error_description"] == "Not found"


async def test_fields_describe_phone_as_multiple(api: Api) -> None:
    fields = await api.result("crm.lead.fields")
    assert fields["PHONE"]["isMultiple"] is True
    assert fields["PHONE"]["type"] == "crm_multifield"
    assert fields["TITLE"]["isMultiple"] is False
    assert fields["ID"]["isReadOnly"] is True
    assert {"ORIGIN_ID", "ORIGINATOR_ID", "STATUS_ID"} <= set(fields)


async def test_status_list_gives_the_lead_stages_with_semantics(api: Api) -> None:
    response = await api.call("crm.status.list", {"filter": {"ENTITY_ID": "STATUS"}})
    body = response.json()
    stages = {row["STATUS_ID"]: row for row in body["result"]}
    assert list(stages) == ["NEW", "IN_PROCESS", "PROCESSED", "JUNK", "CONVERTED"]
    assert stages["JUNK"]["SEMANTICS"] == "F"
    assert stages["CONVERTED"]["SEMANTICS"] == "S"
    assert stages["NEW"]["SEMANTICS"] is None
    assert {"NAME", "SORT"} <= set(stages["NEW"])
    assert body["total"] == 5


async def test_duplicates_by_phone(api: Api) -> None:
    first = await api.add_lead(PHONE=[{"VALUE": PHONE}])
    second = await api.add_lead(PHONE=[{"VALUE": "+7 (700) 111-22-33"}])
    await api.add_lead(PHONE=[{"VALUE": "87001112233"}])
    found = await api.result(
        "crm.duplicate.findbycomm", {"type": "PHONE", "values": [PHONE], "entity_type": "LEAD"}
    )
    assert found == {"LEAD": [first, second]}
    nothing = await api.result("crm.duplicate.findbycomm", {"type": "PHONE", "values": ["+1"]})
    assert nothing == []
    too_many = await api.call(
        "crm.duplicate.findbycomm", {"type": "PHONE", "values": [str(n) for n in range(21)]}
    )
    assert too_many.status_code == 400
    bad_type = await api.call("crm.duplicate.findbycomm", {"type": "FAX", "values": [PHONE]})
    assert bad_type.status_code == 400
