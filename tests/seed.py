"""The seed's three RabbitMQ messages and its error reply, exactly as its README shows them."""

from __future__ import annotations

from typing import Any

SEED_CREATE: dict[str, Any] = {
    "pattern": "user_created",
    "data": {
        "action": "create_card",
        "user": {"id": 123, "full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"},
        "replyQueue": "bitrix.responses",
    },
}
SEED_UPDATE: dict[str, Any] = {
    "pattern": "user_updated",
    "data": {
        "action": "update_card",
        "user": {
            "id": 123,
            "full_name": "Иван Петров",
            "phone": "+77001112233",
            "stage": "IN_PROCESS",
        },
        "replyQueue": "bitrix.responses",
    },
}
SEED_MOVE: dict[str, Any] = {
    "pattern": "user_moved",
    "data": {
        "action": "move_card",
        "user": {
            "id": 123,
            "full_name": "Иван Петров",
            "phone": "+77001112233",
            "stage": "CONVERTED",
        },
        "replyQueue": "bitrix.responses",
    },
}
# The reply to a create without a phone.
SEED_NO_PHONE_REPLY: dict[str, Any] = {
    "pattern": "bitrix.responses",
    "data": {
        "status": "error",
        "action": "create_card",
        "reason": "Missing phone number",
        "user": {"id": 123, "full_name": "Пользователь без телефона", "stage": "NEW"},
        "user_id": 123,
        "attempts": 1,
    },
}
