"""Pure logic of the Bitrix service: field mapping, classification, message checks, backoff."""

from __future__ import annotations

import json

import pytest

from b24sync.bitrix.client import BitrixError, is_transient
from b24sync.bitrix.consumer import RejectedEvent, check, parse, reply_target
from b24sync.bitrix.jobs import describe_failure, retry_delay_ms
from b24sync.bitrix.leads import Leads, phone_entries, split_name
from b24sync.contracts.messages import Action, UserPayload
from b24sync.settings import Settings
from tests.seed import SEED_CREATE, SEED_MOVE, SEED_UPDATE

from .conftest import make_client


def test_split_name() -> None:
    assert split_name("Иван Иванов") == ("Иван", "Иванов")
    assert split_name("  Анна  Мария Петрова ") == ("Анна", "Мария Петрова")
    assert split_name("Мадонна") == ("Мадонна", "")


def test_phone_entries_replace_the_first_and_delete_the_others() -> None:
    existing = [
        {"ID": "11", "VALUE": "+70000000001", "VALUE_TYPE": "WORK"},
        {"ID": "12", "VALUE": "+70000000002", "VALUE_TYPE": "HOME"},
    ]
    assert phone_entries(existing, "+77001112233", "WORK") == [
        {"ID": "11", "VALUE": "+77001112233", "VALUE_TYPE": "WORK"},
        {"ID": "12", "DELETE": "Y"},
    ]
    assert phone_entries([], "+77001112233", "MOBILE") == [
        {"VALUE": "+77001112233", "VALUE_TYPE": "MOBILE"}
    ]


async def test_lead_fields_follow_the_settings(settings: Settings) -> None:
    custom = settings.model_copy(
        update={"stage_map": {"CONVERTED": "WON"}, "originator_id": "crm-x"}
    )
    client = make_client(custom.portal_webhook_url)
    leads = Leads(client, custom)
    user = UserPayload(id=7, full_name="Иван Петров", phone="+77001112233", stage="CONVERTED")
    assert leads.fields(user) == {
        "ORIGINATOR_ID": "crm-x",
        "ORIGIN_ID": "7",
        "TITLE": "Иван Петров",
        "NAME": "Иван",
        "LAST_NAME": "Петров",
        "STATUS_ID": "WON",
    }
    assert leads.stage_id("NEW") == "NEW"  # identity for stages not in the map
    await client.aclose()


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("QUERY_LIMIT_EXCEEDED", 503, True),
        ("OPERATION_TIME_LIMIT", 429, True),
        ("INTERNAL_SERVER_ERROR", 500, True),
        ("ERROR_UNEXPECTED_ANSWER", 500, True),
        ("SOMETHING_NEW", 502, True),
        ("OVERLOAD_LIMIT", 503, False),
        ("PORTAL_DELETED", 500, False),
        ("NO_AUTH_FOUND", 401, False),
        ("insufficient_scope", 401, False),
        ("ERROR_METHOD_NOT_FOUND", 404, False),
        ("INVALID_REQUEST", 400, False),
        ("", 400, False),
    ],
)
def test_error_classification(code: str, status: int, transient: bool) -> None:
    assert is_transient(code, status) is transient


def test_bitrix_error_names_the_method_not_the_url() -> None:
    err = BitrixError("crm.lead.update", "", "Not found", http_status=400, transient=False)
    assert str(err) == "crm.lead.update: Not found"
    assert err.not_found
    assert not BitrixError(
        "crm.lead.x",
        "ERROR_METHOD_NOT_FOUND",
        "Method not found!",
        http_status=404,
        transient=False,
    ).not_found


def test_foreign_failures_are_masked() -> None:
    reason = describe_failure(RuntimeError("POST https://p.bitrix24.kz/rest/1/s3cr3tcode/x failed"))
    assert "s3cr3tcode" not in reason
    assert reason.startswith("RuntimeError: ")


def test_retry_delays_follow_the_seed_schedule() -> None:
    backoff = {"type": "exponential", "delay": 2000}
    assert [retry_delay_ms(backoff, attempt) for attempt in (1, 2)] == [2000, 4000]
    assert retry_delay_ms({"type": "fixed", "delay": 300}, 2) == 300


@pytest.mark.parametrize("body", [SEED_CREATE, SEED_UPDATE, SEED_MOVE])
def test_seed_messages_parse(body: dict[str, object]) -> None:
    event = parse(json.dumps(body).encode())
    check(event)
    assert event.wire() == body


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "Invalid JSON"),
        (b"[1, 2]", "Invalid event: the body is not a JSON object"),
        (b'{"pattern": "user_deleted", "data": {}}', "Unknown pattern: 'user_deleted'"),
        (
            b'{"pattern": "user_created", "data": {"action": "create_card", "user": {"id": "x"}}}',
            "Invalid event: data.user.id:",
        ),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RejectedEvent, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        parse(raw)


def test_events_bitrix24_cannot_act_on() -> None:
    no_phone = json.loads(json.dumps(SEED_CREATE))
    del no_phone["data"]["user"]["phone"]
    with pytest.raises(RejectedEvent, match=r"^Missing phone number$"):
        check(parse(json.dumps(no_phone).encode()))
    mismatch = json.loads(json.dumps(SEED_CREATE))
    mismatch["data"]["action"] = "move_card"
    with pytest.raises(RejectedEvent, match="does not match pattern"):
        check(parse(json.dumps(mismatch).encode()))


def test_reply_target_reads_what_it_can() -> None:
    raw = json.dumps(
        {
            "pattern": "user_deleted",
            "data": {"action": "create_card", "user": {"id": 5, "phone": 42}, "replyQueue": "q"},
        }
    ).encode()
    queue, user, action = reply_target(raw, "default") or ("", None, None)
    assert (queue, action) == ("q", Action.CREATE_CARD)
    assert user is not None
    assert user.id == 5
    assert reply_target(b'{"data": {"user": {}}}', "default") is None
    assert reply_target(b"garbage", "default") is None
    target = reply_target(b'{"data": {"user": {"id": "9"}}}', "default")
    assert target is not None
    assert (target[0], target[2]) == ("default", None)
