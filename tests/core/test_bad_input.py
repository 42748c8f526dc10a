"""Input JSON in UTF-8 cannot carry back (NaN, Infinity, lone surrogates, bytes that are not
UTF-8) is answered with a 422 that names the field and never echoes the value."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from b24sync.core.exceptions import FieldValidationError
from tests.core.test_api import SEED_CREATE, counts, create

JSON = {"content-type": "application/json"}
# Raw JSON values that Python's parser accepts and no strict JSON writer can send back.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]
LONE_SURROGATES = [r'"\ud800"', r'"+7700111223\udfff"', r'"NEW\udbff"']


def with_value(fields: dict[str, Any], field: str, raw: str) -> bytes:
    """`fields` as JSON with `field` set to the raw JSON text `raw`."""
    text = json.dumps({**fields, field: "@@"}, ensure_ascii=False)
    return text.replace('"@@"', raw).encode()


def assert_rejected(response: httpx.Response, loc: list[str | int]) -> list[dict[str, Any]]:
    """A 422 naming `loc`, in FastAPI's shape, with no unsendable value in it anywhere."""
    assert response.status_code == 422, response.text
    response.content.decode("utf-8")  # strict: nothing undecodable was echoed
    errors: list[dict[str, Any]] = json.loads(response.content, parse_constant=_fail)["detail"]
    assert any(error["loc"] == loc for error in errors), errors
    assert all(error["msg"] for error in errors)
    return errors


def _fail(constant: str) -> Any:
    raise AssertionError(f"{constant} echoed in the answer")


@pytest.mark.parametrize("raw", NON_FINITE + LONE_SURROGATES)
@pytest.mark.parametrize("field", ["full_name", "phone", "stage"])
async def test_create_rejects_unsendable_values(
    client: httpx.AsyncClient, connection: AsyncConnection, field: str, raw: str
) -> None:
    before = await counts(connection)
    response = await client.post(
        "/users", content=with_value(SEED_CREATE, field, raw), headers=JSON
    )
    errors = assert_rejected(response, ["body", field])
    assert all("input" not in error for error in errors if error["loc"] == ["body", field])
    assert await counts(connection) == before


@pytest.mark.parametrize(
    ("content", "loc"),
    [
        pytest.param(b"NaN", ["body"], id="bare-nan"),
        pytest.param(b"[Infinity]", ["body"], id="array"),
        pytest.param(with_value(SEED_CREATE, "extra", "NaN"), ["body", "extra"], id="extra-key"),
        pytest.param(
            with_value(SEED_CREATE, "extra", '{"deep": [1, -Infinity]}'),
            ["body", "extra"],
            id="nested",
        ),
        pytest.param(
            with_value(SEED_CREATE, "full_name", '["x", NaN]'), ["body", "full_name"], id="list"
        ),
        pytest.param(
            json.dumps(SEED_CREATE).replace('"stage"', r'"\ud800"').encode(),
            ["body"],
            id="surrogate-key",
        ),
    ],
)
async def test_create_rejects_unsendable_values_anywhere(
    client: httpx.AsyncClient, connection: AsyncConnection, content: bytes, loc: list[str]
) -> None:
    before = await counts(connection)
    assert_rejected(await client.post("/users", content=content, headers=JSON), loc)
    assert await counts(connection) == before


async def test_a_pair_of_surrogates_is_one_character(client: httpx.AsyncClient) -> None:
    content = with_value(SEED_CREATE, "full_name", r'"Иван \ud83d\ude00"')
    response = await client.post("/users", content=content, headers=JSON)
    assert response.status_code == 201, response.text
    assert response.json()["full_name"] == "Иван 😀"


@pytest.mark.parametrize("raw", ["NaN", "-Infinity", r'"\udc00"'])
@pytest.mark.parametrize(
    ("path", "field"),
    [("", "full_name"), ("", "phone"), ("", "stage"), ("/move", "stage")],
)
async def test_changes_reject_unsendable_values(
    client: httpx.AsyncClient, connection: AsyncConnection, path: str, field: str, raw: str
) -> None:
    user = await create(client)
    before = await counts(connection)
    method = "PATCH" if path == "" else "POST"
    response = await client.request(
        method, f"/users/{user['id']}{path}", content=with_value({}, field, raw), headers=JSON
    )
    assert_rejected(response, ["body", field])
    assert await counts(connection) == before
    assert (await client.get(f"/users/{user['id']}")).json() == user


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        pytest.param("stage=%ED%A0%80", ["query", "stage"], id="stage-surrogate"),
        pytest.param("stage=NEW%FF", ["query", "stage"], id="stage-not-utf8"),
        pytest.param("sync_status=%ED%B0%80", ["query", "sync_status"], id="status-surrogate"),
        pytest.param("page=%FF", ["query", "page"], id="page-not-utf8"),
        pytest.param("st%FFage=NEW", ["query", "st\ufffdage"], id="name-not-utf8"),
        pytest.param("page=NaN", ["query", "page"], id="page-nan"),
        pytest.param("limit=Infinity", ["query", "limit"], id="limit-infinity"),
    ],
)
async def test_list_filters_reject_bad_text(
    client: httpx.AsyncClient, query: str, loc: list[str]
) -> None:
    assert_rejected(await client.get(f"/users?{query}"), loc)


async def test_list_filters_take_utf8_text(client: httpx.AsyncClient) -> None:
    await create(client, stage="JUNK")
    # Percent-encoded UTF-8 and raw UTF-8 bytes alike: "JUNK" with a Cyrillic letter in it.
    for query in ("stage=J%D0%A3NK", "stage=JУNK"):
        response = await client.get(f"/users?{query}")
        assert response.status_code == 200, response.text
        assert response.json()["items"] == []
    junk = await client.get("/users?stage=JUNK&sync_status=pending")
    assert junk.json()["pagination"]["total_count"] == 1


@pytest.mark.parametrize("value", ["+7\ud800", float("nan"), float("inf"), {"x": [float("-inf")]}])
def test_field_validation_error_never_echoes_unsendable_input(value: Any) -> None:
    (error,) = FieldValidationError("phone", "not a phone number", value).detail()
    assert error == {"type": "value_error", "loc": ["body", "phone"], "msg": "not a phone number"}


def test_field_validation_error_echoes_sendable_input() -> None:
    (error,) = FieldValidationError("stage", "unknown stage", "WON 😀").detail()
    assert error["input"] == "WON 😀"
