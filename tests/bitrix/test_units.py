"""Pure logic of the Bitrix service: field mapping, classification, message checks, backoff."""

from __future__ import annotations

import json
from typing import Any

import pytest

from b24sync.bitrix.client import BitrixError, is_transient
from b24sync.bitrix.consumer import RejectedEvent, check, parse, reply_target
from b24sync.bitrix.engine import fields_of
from b24sync.bitrix.jobs import JobPayload, describe_failure, retry_delay_ms
from b24sync.bitrix.leads import Lead, LeadFields, phone_entries, split_name
from b24sync.contracts.messages import Action, Event, UserField, UserPayload
from b24sync.settings import Settings
from b24sync.supervisor import plan
from tests.seed import SEED_CREATE, SEED_MOVE, SEED_UPDATE


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


def test_lead_fields_follow_the_settings(settings: Settings) -> None:
    custom = settings.model_copy(
        update={"stage_map": {"CONVERTED": "WON"}, "originator_id": "crm-x"}
    )
    fields = LeadFields(custom)
    user = UserPayload(id=7, full_name="Иван Петров", phone="+77001112233", stage="CONVERTED")
    assert fields.add_params(user) == {
        "fields": {
            "TITLE": "Иван Петров",
            "NAME": "Иван",
            "LAST_NAME": "Петров",
            "STATUS_ID": "WON",
            "ORIGINATOR_ID": "crm-x",
            "ORIGIN_ID": "7",
            "PHONE": [{"VALUE": "+77001112233", "VALUE_TYPE": "WORK"}],
        },
        "params": {"REGISTER_SONET_EVENT": "Y"},
    }
    assert fields.stage_id("NEW") == "NEW"  # identity for stages not in the map


def test_an_update_carries_the_changed_fields_only(settings: Settings) -> None:
    fields = LeadFields(settings)
    user = UserPayload(id=7, full_name="Иван Петров", phone="+77001112233", stage="NEW")
    lead = Lead(id=3, phones=[{"ID": "11", "VALUE": "+70000000000", "VALUE_TYPE": "HOME"}])
    assert fields.update_fields(user, {UserField.STAGE}, lead) == {"STATUS_ID": "NEW"}
    assert fields.update_fields(user, {UserField.PHONE}, lead) == {
        "PHONE": [{"ID": "11", "VALUE": "+77001112233", "VALUE_TYPE": "WORK"}]
    }
    assert fields.update_fields(user, set(), lead) == {}


def test_what_an_event_asks_to_write() -> None:
    def event(action: str, **data: object) -> Event:
        pattern = {"create_card": "user_created", "update_card": "user_updated"}
        user = {"id": 1, "full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
        return Event.model_validate(
            {
                "pattern": pattern.get(action, "user_moved"),
                "data": {"action": action, "user": user, **data},
            }
        )

    everything = {UserField.FULL_NAME, UserField.PHONE, UserField.STAGE}
    # A producer that does not say: every field a create or update carries, a move's stage.
    assert fields_of(event("create_card")) == everything
    assert fields_of(event("update_card")) == everything
    assert fields_of(event("move_card")) == {UserField.STAGE}
    # Core says which fields changed since Bitrix24 last confirmed the user, whatever the action.
    assert fields_of(event("move_card", changed=["phone", "stage"])) == {
        UserField.PHONE,
        UserField.STAGE,
    }


def test_the_emulator_takes_the_bitrix_plan_unless_told_otherwise() -> None:
    def portal_env(**overrides: Any) -> dict[str, str]:
        (portal,) = [s for s in plan(Settings(_env_file=None, **overrides)) if s.name == "portal"]
        return portal.env

    assert portal_env() == {"PORTAL_RATE_LIMIT": "standard"}
    assert portal_env(bitrix_plan="enterprise") == {"PORTAL_RATE_LIMIT": "enterprise"}
    assert portal_env(bitrix_plan="unlimited") == {"PORTAL_RATE_LIMIT": "off"}
    assert portal_env(bitrix_plan="unlimited", portal_rate_limit="standard") == {}


def test_the_plan_sets_the_client_bucket() -> None:
    assert Settings(_env_file=None).bitrix_bucket == (45, 2.0)
    assert Settings(_env_file=None, bitrix_plan="enterprise").bitrix_bucket == (240, 5.0)
    assert Settings(_env_file=None, bitrix_plan="unlimited").bitrix_bucket is None
    overridden = Settings(_env_file=None, bitrix_rate_burst=5, bitrix_rate_per_s=0.5)
    assert overridden.bitrix_bucket == (5, 0.5)


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
    raw = {
        "pattern": "user_deleted",
        "data": {"action": "create_card", "user": {"id": 5, "phone": 42}, "replyQueue": "q"},
    }
    queue, user, action = reply_target(raw, "q") or ("", None, None)
    assert (queue, action) == ("q", Action.CREATE_CARD)
    assert user is not None
    assert user.id == 5
    # Another reply queue than ours gets nothing; no replyQueue means ours.
    assert reply_target(raw, "ours") is None
    target = reply_target({"data": {"user": {"id": "9"}}}, "ours")
    assert target is not None
    assert (target[0], target[2]) == ("ours", None)
    assert reply_target({"data": {"user": {}}}, "ours") is None
    assert reply_target(None, "ours") is None
    # Ids that cannot be a user of Core name nobody to reply about.
    for bad_id in (0, -1, 2**63):
        assert reply_target({"data": {"user": {"id": bad_id}}}, "ours") is None


def test_deep_nesting_and_long_values_are_refused_readably() -> None:
    with pytest.raises(RejectedEvent, match=r"^Invalid JSON: nested too deeply$"):
        parse(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RejectedEvent) as caught:
        parse(json.dumps({"pattern": "x" * 100_000, "data": {}}).encode())
    assert len(str(caught.value)) < 300


def test_a_job_queued_before_jobs_carried_groups_reads_as_a_group_of_one() -> None:
    payload = JobPayload.model_validate({"event": SEED_CREATE, "message_id": "evt-1"})
    (queued,) = payload.events
    assert (queued.event, queued.message_id, queued.key) == (
        Event.model_validate(SEED_CREATE),
        "evt-1",
        "",
    )
    assert JobPayload.model_validate(payload.wire()) == payload
