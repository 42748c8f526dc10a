"""A stand-in for the seed's original NestJS Core, its RabbitMQ side only: it sends the seed's
three messages (the NestJS envelope, no message_id, no version) and reads the replies, keeping
each user's `bitrix_lead_id` by `user_id` or `user.id`.

Like the original, it sends an update or a move only once it knows the user's lead id: before
that, it sends nothing.
"""

from __future__ import annotations

import json
from typing import Any

import aio_pika

from b24sync.settings import Settings
from tests.bitrix.conftest import Bus
from tests.seed import SEED_CREATE, SEED_MOVE, SEED_UPDATE


class OriginalCore(Bus):
    """Publishes to the test's event queue and reads the test's reply queue."""

    def __init__(self, settings: Settings, channel: aio_pika.abc.AbstractChannel) -> None:
        super().__init__(settings, channel)
        self.lead_ids: dict[int, int] = {}
        self.errors: dict[int, str] = {}

    def _message(self, seed: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
        data = {**seed["data"], "user": user, "replyQueue": self.settings.rabbitmq_reply_queue}
        return {**seed, "data": data}

    async def create(self, user: dict[str, Any]) -> None:
        await self.publish(self._message(SEED_CREATE, user))

    async def update(self, user: dict[str, Any]) -> bool:
        """Sends `user_updated`; False, and nothing sent, while the lead id is unknown."""
        return await self._change(SEED_UPDATE, user)

    async def move(self, user: dict[str, Any]) -> bool:
        """Sends `user_moved`; False, and nothing sent, while the lead id is unknown."""
        return await self._change(SEED_MOVE, user)

    async def _change(self, seed: dict[str, Any], user: dict[str, Any]) -> bool:
        if user["id"] not in self.lead_ids:
            return False
        await self.publish(self._message(seed, user))
        return True

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        data = json.loads(message.body)["data"]
        user_id = data.get("user_id") or data["user"]["id"]
        if data["status"] == "success":
            self.lead_ids[user_id] = data["bitrix_lead_id"]
        else:
            self.errors[user_id] = data.get("reason") or data.get("error")
        await super()._on_reply(message)
