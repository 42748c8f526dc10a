"""The webhook transport: URLs, encodings, authentication and error shapes."""

from __future__ import annotations

import pytest

from tests.portal.conftest import Api


async def test_form_encoded_nested_body(api: Api) -> None:
    response = await api.http.post(
        f"{api.webhook_url}/crm.lead.add.json",
        data={
            "fields[NAME]": "Form",
            "fields[PHONE][0][VALUE]": "+77001112233",
            "fields[PHONE][0][VALUE_TYPE]": "MOBILE",
            "fields[PHONE][1][VALUE]": "+77001112244",
        },
    )
    lead_id = response.json()["result"]
    lead = await api.admin("GET", f"/admin/leads/{lead_id}")
    assert lead["NAME"] == "Form"
    assert [(p["VALUE"], p["VALUE_TYPE"]) for p in lead["PHONE"]] == [
        ("+77001112233", "MOBILE"),
        ("+77001112244", "WORK"),
    ]


async def test_query_string_get_and_case_insensitive_method(api: Api) -> None:
    lead_id = await api.add_lead(NAME="Ivan")
    response = await api.http.get(
        f"{api.webhook_url}/CRM.Lead.List.json",
        params={"select[]": ["ID", "NAME"], "filter[=ID]": str(lead_id)},
    )
    assert response.status_code == 200
    assert response.json()["result"] == [{"ID": str(lead_id), "NAME": "Ivan"}]


async def test_invalid_json_means_no_parameters(api: Api) -> None:
    response = await api.http.post(
        f"{api.webhook_url}/crm.lead.get",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error_description"] == "ID is not defined or invalid."
    added = await api.http.post(
        f"{api.webhook_url}/crm.lead.add",
        content=b"[1, 2",
        headers={"content-type": "application/json"},
    )
    assert isinstance(added.json()["result"], int)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/rest/2/b24sync-local/crm.lead.list", "NO_AUTH_FOUND"),
        ("/rest/1/wrong-code/crm.lead.list", "INVALID_CREDENTIALS"),
        ("/rest/crm.lead.list", "NO_AUTH_FOUND"),
    ],
)
async def test_wrong_webhook_is_401(api: Api, path: str, code: str) -> None:
    response = await api.http.post(f"{api.server.base_url}{path}", json={})
    assert response.status_code == 401
    assert response.json()["error"] == code
    assert response.json()["error_description"]


async def test_unknown_method(api: Api) -> None:
    response = await api.call("crm.lead.explode")
    assert response.status_code == 404
    assert response.json() == {
        "error": "ERROR_METHOD_NOT_FOUND",
        "error_description": "Method not found!",
    }


async def test_the_webhook_code_never_reaches_the_log(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.add_lead(NAME="Ivan")
    await api.http.post(f"{api.server.base_url}/rest/1/wrong-code/crm.lead.add", json={})
    output = capsys.readouterr()
    assert "crm.lead.add" in output.out
    assert "b24sync-local" not in output.out + output.err
    assert "wrong-code" not in output.out + output.err
