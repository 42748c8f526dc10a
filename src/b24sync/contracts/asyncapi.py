"""The AsyncAPI 3.0 document of the RabbitMQ messages (`docs/asyncapi.yaml`), generated from the
models in `messages.py` so that it cannot drift from what the services read and write.

    python -m b24sync.contracts.asyncapi [PATH]    # or: make asyncapi

writes it (to docs/asyncapi.yaml by default); tests/contracts/test_asyncapi.py fails when the
committed file differs from what this module makes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from b24sync.contracts.messages import (
    ACTION_BY_PATTERN,
    DEFAULT_REPLY_QUEUE,
    REPLY_PATTERN,
    EventData,
    Pattern,
    ReplyData,
)

DEFAULT_PATH = Path("docs/asyncapi.yaml")
EVENTS_QUEUE = "bitrix_queue"  # RABBITMQ_QUEUE's default
_SCHEMAS = "#/components/schemas/"
_USER = {"id": 123, "full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
_NO_PHONE = {"id": 123, "full_name": "Пользователь без телефона", "stage": "NEW"}

_EVENT_PROPERTIES = {
    "message_id": {
        "type": "string",
        "description": "The outbox event's id, unique per event; the Bitrix service marks the "
        "event under it for the BullMQ job that carries it, so a redelivery makes no second "
        "job. Absent from the original NestJS Core's messages.",
    },
    "content_type": {"type": "string", "const": "application/json"},
    "delivery_mode": {"type": "integer", "const": 2, "description": "Persistent."},
}
_REPLY_PROPERTIES = {
    "correlation_id": {
        "type": "string",
        "description": "The `message_id` of the event this reply answers, when the event had "
        "one: Core ties the reply to that event (see docs/architecture.md, 'Which event a "
        "reply answers').",
    },
    "content_type": {"type": "string", "const": "application/json"},
    "delivery_mode": {"type": "integer", "const": 2, "description": "Persistent."},
}
_QUEUE_BINDING = {"is": "queue", "bindingVersion": "0.3.0"}


def _schemas() -> dict[str, Any]:
    """The JSON Schemas of the models, their shared definitions as components."""
    schemas: dict[str, Any] = {}
    for model in (EventData, ReplyData):
        schema = model.model_json_schema(by_alias=True, ref_template=_SCHEMAS + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return dict(sorted(schemas.items()))


def _envelope(pattern: str, data: str) -> dict[str, Any]:
    """The NestJS event envelope: `{"pattern": ..., "data": ...}`."""
    return {
        "type": "object",
        "required": ["pattern", "data"],
        "properties": {
            "pattern": {"type": "string", "const": pattern},
            "data": {"$ref": _SCHEMAS + data},
        },
    }


def _headers(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "AMQP basic properties of the message.",
        "properties": properties,
    }


def _event_message(pattern: Pattern) -> dict[str, Any]:
    action = ACTION_BY_PATTERN[pattern]
    user = dict(_USER, stage="IN_PROCESS") if pattern is not Pattern.USER_CREATED else _USER
    lead = None if pattern is Pattern.USER_CREATED else 456
    return {
        "name": pattern.value,
        "title": f"{pattern.value} ({action.value})",
        "summary": f"Core asks for the user's lead to be written: {action.value}.",
        "contentType": "application/json",
        "headers": _headers(_EVENT_PROPERTIES),
        "payload": _envelope(pattern.value, EventData.__name__),
        "correlationId": {"location": "$message.header#/message_id"},
        "examples": [
            {
                "name": f"{pattern.value} from Core",
                "headers": {"message_id": "1042", "content_type": "application/json"},
                "payload": {
                    "pattern": pattern.value,
                    "data": {
                        "action": action.value,
                        "user": {**user, "bitrix_lead_id": lead, "version": 1},
                        "replyQueue": DEFAULT_REPLY_QUEUE,
                        "changed": ["full_name", "phone", "stage"],
                    },
                },
            },
            {
                "name": f"{pattern.value} as the seed's NestJS Core sends it",
                "payload": {
                    "pattern": pattern.value,
                    "data": {
                        "action": action.value,
                        "user": user,
                        "replyQueue": DEFAULT_REPLY_QUEUE,
                    },
                },
            },
        ],
    }


def _reply_message() -> dict[str, Any]:
    return {
        "name": REPLY_PATTERN,
        "title": "Bitrix service's reply",
        "summary": "The outcome of one event: success (with the lead id) or error (with the "
        "reason).",
        "description": "Core also reads the reply bare (the `data` object alone) and in the "
        "original NestJS Bitrix service's shapes: `user_id` without a `user` object and the "
        "reason under `error` instead of `reason`.",
        "contentType": "application/json",
        "headers": _headers(_REPLY_PROPERTIES),
        "payload": _envelope(REPLY_PATTERN, ReplyData.__name__),
        "correlationId": {"location": "$message.header#/correlation_id"},
        "examples": [
            {
                "name": "success",
                "headers": {"correlation_id": "1042", "content_type": "application/json"},
                "payload": {
                    "pattern": REPLY_PATTERN,
                    "data": {
                        "status": "success",
                        "action": "create_card",
                        "user": {**_USER, "version": 1},
                        "user_id": 123,
                        "bitrix_lead_id": 456,
                        "attempts": 1,
                    },
                },
            },
            {
                "name": "error",
                "headers": {"correlation_id": "1043", "content_type": "application/json"},
                "payload": {
                    "pattern": REPLY_PATTERN,
                    "data": {
                        "status": "error",
                        "action": "create_card",
                        "reason": "Missing phone number",
                        "user": _NO_PHONE,
                        "user_id": 123,
                        "attempts": 1,
                        "retryable": False,
                    },
                },
            },
        ],
    }


def document() -> dict[str, Any]:
    """The AsyncAPI document, as a mapping ready to dump."""
    events = {
        pattern.value: {"$ref": f"#/components/messages/{pattern.value}"} for pattern in Pattern
    }
    reply_ref = {"$ref": "#/components/messages/reply"}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "b24sync messages",
            "version": "0.1.0",
            "description": "Core and the Bitrix service talk through two durable RabbitMQ "
            "queues on the default exchange, in the NestJS microservice envelope "
            '`{"pattern": ..., "data": ...}` the seed\'s own system uses. Core publishes user '
            f"events to `{EVENTS_QUEUE}`; the Bitrix service answers each on the queue named by "
            f"`data.replyQueue` (`{DEFAULT_REPLY_QUEUE}`). Both publish with publisher "
            "confirms. The queue names are settings (RABBITMQ_QUEUE, RABBITMQ_REPLY_QUEUE). "
            "Generated from src/b24sync/contracts by `make asyncapi`: do not edit by hand.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RABBITMQ_URL's default.",
            }
        },
        "channels": {
            "bitrix_queue": {
                "address": EVENTS_QUEUE,
                "description": "Core → the Bitrix service: a user was created, changed or moved.",
                "messages": events,
                "bindings": {"amqp": {**_QUEUE_BINDING, "queue": _queue(EVENTS_QUEUE)}},
            },
            "bitrix_responses": {
                "address": DEFAULT_REPLY_QUEUE,
                "description": "The Bitrix service → Core: the outcome of each event.",
                "messages": {"reply": reply_ref},
                "bindings": {"amqp": {**_QUEUE_BINDING, "queue": _queue(DEFAULT_REPLY_QUEUE)}},
            },
        },
        "operations": {
            "sendUserEvent": {
                "action": "send",
                "title": "Core publishes a user's change (from its outbox)",
                "channel": {"$ref": "#/channels/bitrix_queue"},
                "messages": [
                    {"$ref": f"#/channels/bitrix_queue/messages/{pattern.value}"}
                    for pattern in Pattern
                ],
                "reply": {
                    "channel": {"$ref": "#/channels/bitrix_responses"},
                    "messages": [{"$ref": "#/channels/bitrix_responses/messages/reply"}],
                },
            },
            "receiveUserEvent": {
                "action": "receive",
                "title": "The Bitrix service consumes the events into BullMQ jobs",
                "channel": {"$ref": "#/channels/bitrix_queue"},
                "messages": [
                    {"$ref": f"#/channels/bitrix_queue/messages/{pattern.value}"}
                    for pattern in Pattern
                ],
            },
            "sendReply": {
                "action": "send",
                "title": "The Bitrix service answers an event once it is written or failed",
                "channel": {"$ref": "#/channels/bitrix_responses"},
                "messages": [{"$ref": "#/channels/bitrix_responses/messages/reply"}],
            },
            "receiveReply": {
                "action": "receive",
                "title": "Core applies a reply to the user's sync state",
                "channel": {"$ref": "#/channels/bitrix_responses"},
                "messages": [{"$ref": "#/channels/bitrix_responses/messages/reply"}],
            },
        },
        "components": {
            "messages": {
                **{pattern.value: _event_message(pattern) for pattern in Pattern},
                "reply": _reply_message(),
            },
            "schemas": _schemas(),
        },
    }


def _queue(name: str) -> dict[str, Any]:
    return {"name": name, "durable": True, "exclusive": False, "autoDelete": False}


def render() -> str:
    """The document as the YAML committed in docs/asyncapi.yaml."""
    header = "# Generated by `make asyncapi` (python -m b24sync.contracts.asyncapi): do not edit.\n"
    body = yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=100)
    return header + body


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.write_text(render(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
