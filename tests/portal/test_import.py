"""crm.item.batchImport: up to 20 new leads in one command, each with its own answer."""

from __future__ import annotations

from typing import Any

from b24sync.bitrix.batch import query_string
from tests.portal.conftest import Api


def item(n: int) -> dict[str, Any]:
    """A lead as `crm.item.*` names its fields."""
    return {
        "title": f"Иван {n}",
        "name": "Иван",
        "lastName": str(n),
        "stageId": "IN_PROCESS",
        "originatorId": "b24sync",
        "originId": str(n),
        "fm": [{"typeId": "PHONE", "valueType": "WORK", "value": f"+7700000000{n}"}],
        "somethingUnknown": "dropped",
    }


async def test_batch_import_creates_leads_with_their_fields_and_phones(api: Api) -> None:
    result = await api.result(
        "crm.item.batchImport", {"entityTypeId": 1, "data": [item(1), item(2)]}
    )

    ids = [answer["item"]["id"] for answer in result["items"]]
    assert len(ids) == 2
    leads = await api.admin("GET", "/admin/leads")
    assert [int(lead["ID"]) for lead in leads] == ids
    first = leads[0]
    assert (first["TITLE"], first["NAME"], first["LAST_NAME"]) == ("Иван 1", "Иван", "1")
    assert (first["STATUS_ID"], first["ORIGINATOR_ID"], first["ORIGIN_ID"]) == (
        "IN_PROCESS",
        "b24sync",
        "1",
    )
    assert [(p["VALUE"], p["VALUE_TYPE"]) for p in first["PHONE"]] == [("+77000000001", "WORK")]
    assert "somethingUnknown" not in first


async def test_batch_import_inside_a_batch_request(api: Api) -> None:
    command = "crm.item.batchImport?" + query_string({"entityTypeId": 1, "data": [item(3)]})
    batch = await api.result("batch", {"halt": 0, "cmd": {"import": command}})
    (answer,) = batch["result"]["import"]["items"]
    (lead,) = await api.admin("GET", "/admin/leads")
    assert answer == {"item": {"id": int(lead["ID"])}}
    assert lead["PHONE"][0]["VALUE"] == "+77000000003"


async def test_batch_import_refuses_more_than_20_items_and_other_entity_types(api: Api) -> None:
    too_many = await api.call(
        "crm.item.batchImport", {"entityTypeId": 1, "data": [item(n) for n in range(21)]}
    )
    assert too_many.status_code == 400
    assert too_many.json()["error"] == "MAX_IMPORT_BATCH_SIZE_EXCEEDED"
    deals = await api.call("crm.item.batchImport", {"entityTypeId": 2, "data": [item(1)]})
    assert (deals.status_code, deals.json()["error"]) == (400, "NOT_FOUND")
    result = await api.result("crm.item.batchImport", {"entityTypeId": 1, "data": ["not an item"]})
    assert result["items"][0]["error"] == "CRM_FIELD_ERROR_VALUE_NOT_VALID"
    assert await api.admin("GET", "/admin/leads") == []
