"""batch: references, the 50-command limit, halt, and PHP-style empty maps."""

from __future__ import annotations

from tests.portal.conftest import Api


async def test_batch_with_references(api: Api) -> None:
    body = (
        await api.call(
            "batch",
            {
                "halt": 0,
                "cmd": {
                    "add": "crm.lead.add?fields[NAME]=Ivan&fields[PHONE][0][VALUE]=%2B7700",
                    "get": "crm.lead.get?id=$result[add]",
                    "find": "crm.lead.list?filter[NAME]=$result[get][NAME]&select[]=ID",
                    "phone": "crm.lead.list?filter[PHONE]=$result[get][PHONE][0][VALUE]",
                },
            },
        )
    ).json()
    batch = body["result"]
    lead_id = batch["result"]["add"]
    assert isinstance(lead_id, int)
    assert batch["result"]["get"]["ID"] == str(lead_id)
    assert batch["result"]["get"]["PHONE"][0]["VALUE"] == "+7700"
    assert batch["result"]["find"] == [{"ID": str(lead_id)}]
    assert [row["ID"] for row in batch["result"]["phone"]] == [str(lead_id)]
    assert batch["result_error"] == []
    assert batch["result_total"] == {"find": 1, "phone": 1}
    assert batch["result_next"] == []
    assert set(batch["result_time"]) == {"add", "get", "find", "phone"}
    assert "start" in body["time"]


async def test_batch_keeps_going_without_halt_and_stops_with_it(api: Api) -> None:
    cmd = {"a": "crm.lead.get?id=999", "b": "crm.lead.add?fields[NAME]=X"}
    going = await api.result("batch", {"halt": 0, "cmd": cmd})
    assert going["result_error"] == {"a": {"error": "", "error_description": "Not found"}}
    assert isinstance(going["result"]["b"], int)

    halted = await api.result("batch", {"halt": 1, "cmd": cmd})
    assert list(halted["result_error"]) == ["a"]
    assert halted["result"] == []
    assert len(await api.admin("GET", "/admin/leads")) == 1


async def test_batch_over_50_commands_and_nested_batch(api: Api) -> None:
    cmd = {f"c{n}": "crm.lead.fields" for n in range(52)}
    cmd["nested"] = "batch?cmd[x]=crm.lead.fields"
    batch = await api.result("batch", {"cmd": cmd})
    assert len(batch["result"]) == 50
    errors = batch["result_error"]
    assert errors["c50"]["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"
    assert errors["c51"]["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"
    assert errors["nested"]["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"

    nested = await api.result("batch", {"cmd": {"x": "batch?cmd[y]=crm.lead.fields"}})
    assert nested["result_error"]["x"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"


async def test_batch_with_a_command_list_answers_lists(api: Api) -> None:
    batch = await api.result(
        "batch", {"cmd": ["crm.lead.add?fields[NAME]=A", "crm.lead.get?id=$result[0]"]}
    )
    assert isinstance(batch["result"], list)
    assert batch["result"][1]["ID"] == str(batch["result"][0])
    assert batch["result_error"] == []


async def test_batch_form_encoded(api: Api) -> None:
    response = await api.http.post(
        f"{api.webhook_url}/batch.json",
        data={"halt": "0", "cmd[one]": "crm.lead.add?fields[TITLE]=Form", "cmd[two]": "nope.x"},
    )
    batch = response.json()["result"]
    assert isinstance(batch["result"]["one"], int)
    assert batch["result_error"]["two"]["error"] == "ERROR_METHOD_NOT_FOUND"
