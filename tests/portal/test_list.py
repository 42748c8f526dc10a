"""crm.lead.list: select, filter prefixes, order and paging."""

from __future__ import annotations

from typing import Any

from tests.portal.conftest import Api


async def _add_many(api: Api, count: int) -> list[int]:
    """Adds leads in batches of 50 (one request each), named N0, N1, ..."""
    ids: list[int] = []
    for offset in range(0, count, 50):
        cmd = {
            f"l{n}": f"crm.lead.add?fields[NAME]=N{n}&fields[ORIGIN_ID]={n}"
            for n in range(offset, min(offset + 50, count))
        }
        result = await api.result("batch", {"cmd": cmd})
        ids.extend(result["result"][key] for key in cmd)
    return ids


async def _ids(api: Api, params: dict[str, Any]) -> list[int]:
    return [int(row["ID"]) for row in await api.result("crm.lead.list", params)]


async def test_star_select_excludes_multi_and_user_fields(api: Api) -> None:
    await api.add_lead(NAME="Ivan", PHONE=[{"VALUE": "+1"}], UF_CRM_SOURCE="site")
    [star] = await api.result("crm.lead.list", {"select": ["*"]})
    assert star["NAME"] == "Ivan"
    assert "PHONE" not in star
    assert "UF_CRM_SOURCE" not in star
    [named] = await api.result("crm.lead.list", {"select": ["*", "PHONE", "UF_*"]})
    assert named["PHONE"][0]["VALUE"] == "+1"
    assert named["UF_CRM_SOURCE"] == "site"
    [narrow] = await api.result("crm.lead.list", {"select": ["NAME"]})
    assert set(narrow) == {"ID", "NAME"}


async def test_filter_prefixes(api: Api) -> None:
    ivan = await api.add_lead(NAME="Ivan", STATUS_ID="NEW", ORIGINATOR_ID="b24sync", ORIGIN_ID="7")
    petr = await api.add_lead(NAME="Petr", STATUS_ID="IN_PROCESS", PHONE=[{"VALUE": "+77"}])
    anna = await api.add_lead(NAME="Anna", STATUS_ID="JUNK", PHONE=[{"VALUE": "+88"}])
    cases: list[tuple[dict[str, Any], list[int]]] = [
        ({"ORIGINATOR_ID": "b24sync", "ORIGIN_ID": "7"}, [ivan]),
        ({"ORIGIN_ID": "07"}, []),  # a string field: no numeric equality
        ({"!ORIGIN_ID": ""}, [ivan]),
        ({"=STATUS_ID": "IN_PROCESS"}, [petr]),
        ({"!=STATUS_ID": "NEW"}, [petr, anna]),
        ({"!STATUS_ID": "NEW"}, [petr, anna]),
        ({">ID": ivan}, [petr, anna]),
        ({">=ID": petr}, [petr, anna]),
        ({"<ID": petr}, [ivan]),
        ({"<=ID": str(petr)}, [ivan, petr]),
        ({"@STATUS_ID": ["NEW", "JUNK"]}, [ivan, anna]),
        ({"!@STATUS_ID": ["NEW", "JUNK"]}, [petr]),
        ({"%NAME": "an"}, [ivan, anna]),
        ({"PHONE": " +77 "}, [petr]),
        ({"PHONE": "+7"}, []),
        ({"ID": [ivan, anna]}, [ivan, anna]),
    ]
    for lead_filter, expected in cases:
        assert await _ids(api, {"filter": lead_filter}) == expected, lead_filter


async def test_order_by_field_and_direction(api: Api) -> None:
    ids = [await api.add_lead(NAME=name) for name in ("b", "c", "a")]
    assert await _ids(api, {"order": {"ID": "DESC"}}) == ids[::-1]
    assert await _ids(api, {"order": {"NAME": "ASC"}}) == [ids[2], ids[0], ids[1]]


async def test_paging_by_50_with_next_and_total(api: Api) -> None:
    ids = await _add_many(api, 120)
    first = (await api.call("crm.lead.list", {"select": ["ID"]})).json()
    assert (len(first["result"]), first["next"], first["total"]) == (50, 50, 120)
    last = (await api.call("crm.lead.list", {"select": ["ID"], "start": 100})).json()
    assert [int(row["ID"]) for row in last["result"]] == ids[100:]
    assert "next" not in last
    assert last["total"] == 120


async def test_start_minus_one_skips_the_count(api: Api) -> None:
    ids = await _add_many(api, 60)
    page = (
        await api.call(
            "crm.lead.list",
            {"select": ["ID"], "filter": {">ID": ids[30]}, "order": {"ID": "ASC"}, "start": -1},
        )
    ).json()
    assert [int(row["ID"]) for row in page["result"]] == ids[31:]
    assert "next" not in page
    assert "total" not in page


async def test_a_look_up_by_origin_ids_finds_each_lead_of_them(api: Api) -> None:
    ids = await _add_many(api, 120)
    await api.result("crm.lead.update", {"id": ids[5], "fields": {"ORIGIN_ID": "moved"}})
    await api.result("crm.lead.delete", {"id": ids[7]})
    params = {
        "filter": {"@ORIGIN_ID": ["5", "7", "9", "110", "moved", "nobody"], ">ID": ids[8]},
        "order": {"ID": "ASC"},
    }
    # The index by ORIGIN_ID follows updates and deletes; the other conditions still apply.
    assert await _ids(api, params) == [ids[9], ids[110]]
    assert await _ids(api, {"filter": {"=ORIGIN_ID": "moved"}}) == [ids[5]]
    assert await _ids(api, {"filter": {"@ORIGIN_ID": "9,110"}}) == [ids[9], ids[110]]
