"""A stand-in for the seed's original NestJS Bitrix service, written from what is known of it
(the seed document and issue 10), and nothing more: no look-ups, no versions, no merging.

It consumes the events from ``bitrix_queue`` in the NestJS envelope and runs each as a job, one at
a time (BullMQ's default concurrency): a create is ``crm.lead.add`` with TITLE, NAME, LAST_NAME,
PHONE and STATUS_ID; an update is ``crm.lead.update`` of ``user.bitrix_lead_id`` with the same
fields, a move with the stage. Every failure spends an attempt; three attempts, the second after
`backoff_s`, the third after twice that (the seed's 2 s and 4 s). The replies are what
``ClientProxy.emit('bitrix.responses', data)`` publishes: the envelope, no message_id, no
correlation_id, and these bodies:

- success: ``{"status": "success", "action", "user_id", "bitrix_lead_id", "attempts"}``;
- the last attempt failed: ``{"status": "error", "error": "<message>", "user_id", "attempts": 3,
  "final_attempt": true}``;
- no phone: the seed's ``{"status": "error", "reason": "Missing phone number", "user": {...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx

from tests.bitrix.conftest import publish

ATTEMPTS = 3
REPLY_PATTERN = "bitrix.responses"
DEFAULT_REPLY_QUEUE = "bitrix.responses"


class BitrixCallError(Exception):
    """Bitrix24 answered with an error, or could not be reached."""


@dataclass
class Job:
    action: str
    user: dict[str, Any]
    reply_queue: str
    attempts_made: int = 0


def lead_fields(user: dict[str, Any]) -> dict[str, Any]:
    first_name, _, last_name = user["full_name"].partition(" ")
    return {
        "TITLE": user["full_name"],
        "NAME": first_name,
        "LAST_NAME": last_name,
        "PHONE": [{"VALUE": user["phone"], "VALUE_TYPE": "WORK"}],
        "STATUS_ID": user["stage"],
    }


class OriginalBitrixService:
    def __init__(
        self, *, amqp_url: str, queue: str, webhook_url: str, backoff_s: float = 2.0
    ) -> None:
        self.amqp_url = amqp_url
        self.queue = queue
        self.webhook_url = webhook_url
        self.backoff_s = backoff_s
        self._jobs: asyncio.Queue[Job] = asyncio.Queue()
        self._retries: set[asyncio.TimerHandle] = set()
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._http = httpx.AsyncClient(timeout=10)
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect(self.amqp_url)
        self._channel = await self._connection.channel()
        queue = await self._channel.declare_queue(self.queue, durable=True)
        self._worker = asyncio.create_task(self._work())
        await queue.consume(self._on_event, no_ack=True)

    async def stop(self) -> None:
        for handle in self._retries:
            handle.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._connection is not None:
            await self._connection.close()
        await self._http.aclose()

    async def _on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        data = json.loads(message.body)["data"]
        job = Job(data["action"], data["user"], data.get("replyQueue", DEFAULT_REPLY_QUEUE))
        await self._jobs.put(job)

    async def _work(self) -> None:
        while True:
            await self._process(await self._jobs.get())

    async def _process(self, job: Job) -> None:
        if not job.user.get("phone"):
            await self._reply(
                job, {"status": "error", "reason": "Missing phone number", "user": job.user}
            )
            return
        job.attempts_made += 1
        try:
            lead_id = await self._call(job)
        except BitrixCallError as exc:
            if job.attempts_made < ATTEMPTS:
                delay = self.backoff_s * 2 ** (job.attempts_made - 1)
                self._retry_later(job, delay)
                return
            await self._reply(
                job,
                {
                    "status": "error",
                    "error": str(exc),
                    "user_id": job.user["id"],
                    "attempts": job.attempts_made,
                    "final_attempt": True,
                },
            )
            return
        await self._reply(
            job,
            {
                "status": "success",
                "action": job.action,
                "user_id": job.user["id"],
                "bitrix_lead_id": lead_id,
                "attempts": job.attempts_made,
            },
        )

    def _retry_later(self, job: Job, delay_s: float) -> None:
        def put_back() -> None:
            self._retries.discard(handle)
            self._jobs.put_nowait(job)

        handle = asyncio.get_running_loop().call_later(delay_s, put_back)
        self._retries.add(handle)

    async def _call(self, job: Job) -> int:
        if job.action == "create_card":
            lead_id: int = await self._rest("crm.lead.add", {"fields": lead_fields(job.user)})
            return lead_id
        lead_id = job.user.get("bitrix_lead_id") or 0
        if not lead_id:
            raise BitrixCallError(
                f"Cannot {job.action}: user {job.user['id']} has no bitrix_lead_id"
            )
        if job.action == "update_card":
            fields = lead_fields(job.user)
        else:
            fields = {"STATUS_ID": job.user["stage"]}
        await self._rest("crm.lead.update", {"id": lead_id, "fields": fields})
        return lead_id

    async def _rest(self, method: str, params: dict[str, Any]) -> Any:
        try:
            response = await self._http.post(f"{self.webhook_url}/{method}", json=params)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise BitrixCallError(f"{method}: {exc}") from exc
        if response.status_code != 200 or "error" in body:
            raise BitrixCallError(
                f"{method}: {body.get('error')}: {body.get('error_description', '')}"
            )
        return body["result"]

    async def _reply(self, job: Job, data: dict[str, Any]) -> None:
        assert self._channel is not None
        # NestJS's RabbitMQ client asserts its queue before it sends.
        await self._channel.declare_queue(job.reply_queue, durable=True)
        await publish(self._channel, job.reply_queue, {"pattern": REPLY_PATTERN, "data": data})
