"""The wire format shared by Core and the Bitrix service: one definition of every message."""

from b24sync.contracts.messages import (
    ACTION_BY_PATTERN,
    DEFAULT_REPLY_QUEUE,
    MAX_ID,
    REPLY_PATTERN,
    Action,
    Event,
    EventData,
    MalformedMessageError,
    Pattern,
    Reply,
    ReplyData,
    ReplyStatus,
    UserField,
    UserPayload,
    parse_event,
    parse_reply,
)

__all__ = [
    "ACTION_BY_PATTERN",
    "DEFAULT_REPLY_QUEUE",
    "MAX_ID",
    "REPLY_PATTERN",
    "Action",
    "Event",
    "EventData",
    "MalformedMessageError",
    "Pattern",
    "Reply",
    "ReplyData",
    "ReplyStatus",
    "UserField",
    "UserPayload",
    "parse_event",
    "parse_reply",
]
