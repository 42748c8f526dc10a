from __future__ import annotations

import json

import pytest

from b24sync.contracts import (
    Action,
    Event,
    EventData,
    MalformedMessageError,
    Pattern,
    Reply,
    ReplyData,
    ReplyStatus,
    UserPayload,
    parse_event,
    parse_reply,
)
from tests.seed import SEED_CREATE, SEED_NO_PHONE_REPLY


def test_seed_event_round_trips_unchanged() -> None:
    event = parse_event(json.dumps(SEED_CREATE, ensure_ascii=False).encode())
    assert event.pattern is Pattern.USER_CREATED
    assert event.data.action is Action.CREATE_CARD
    assert event.data.user.version is None
    assert event.wire() == SEED_CREATE


def test_event_with_added_fields() -> None:
    user = UserPayload(id=1, full_name="A", phone="+77001112233", stage="NEW", version=3)
    event = Event(
        pattern=Pattern.USER_UPDATED,
        data=EventData(action=Action.UPDATE_CARD, user=user, replyQueue="bitrix.responses"),
    )
    wire = event.wire()
    assert wire["data"]["user"]["version"] == 3
    assert wire["data"]["replyQueue"] == "bitrix.responses"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'{"pattern": "user_deleted", "data": {}}', "schema"),
        (b'{"pattern": "user_created", "data": {"action": "create_card"}}', "schema"),
        (b"[]", "schema"),
    ],
)
def test_bad_events_raise_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessageError, match=reason):
        parse_event(body)


def test_seed_error_reply_shape() -> None:
    reply = Reply(
        data=ReplyData(
            status=ReplyStatus.ERROR,
            action=Action.CREATE_CARD,
            reason="Missing phone number",
            user=UserPayload.model_validate(
                {"id": 123, "full_name": "Пользователь без телефона", "stage": "NEW"}
            ),
            attempts=1,
        )
    )
    assert reply.wire() == SEED_NO_PHONE_REPLY


def test_reply_is_read_bare_and_enveloped() -> None:
    data = {
        "status": "success",
        "action": "create_card",
        "user": {"id": 5, "version": 2},
        "bitrix_lead_id": 456,
    }
    bare = parse_reply(json.dumps(data))
    enveloped = parse_reply(json.dumps({"pattern": "bitrix.responses", "data": data}))
    assert bare == enveloped
    assert bare.bitrix_lead_id == 456
    assert bare.user.version == 2


def test_malformed_reply() -> None:
    with pytest.raises(MalformedMessageError):
        parse_reply(b'{"status": "maybe", "user": {"id": 1}}')
