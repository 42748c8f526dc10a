"""RabbitMQ cluster settings: with quorum queues, every service declares both queues alike and
the whole flow runs on them."""

from __future__ import annotations

import aio_pika
import pytest

from b24sync.settings import Settings
from tests.bitrix.conftest import Admin, ServiceFactory
from tests.conftest import eventually
from tests.core.helpers import running_core


async def test_the_whole_flow_runs_on_quorum_queues(
    fast_settings: Settings,
    database_url: str,
    portal: object,
    admin: Admin,
    start_service: ServiceFactory,
) -> None:
    settings = fast_settings.model_copy(
        update={"database_url": database_url, "rabbitmq_queue_type": "quorum"}
    )
    await start_service(rabbitmq_queue_type="quorum")
    async with running_core(settings) as core:
        created = await core.post(
            "/users", json={"full_name": "Иван Иванов", "phone": "+77001112233"}
        )
        user_id = created.json()["id"]

        async def synced() -> bool:
            user = (await core.get(f"/users/{user_id}")).json()
            return bool(user["sync"]["status"] == "synced")

        await eventually(synced)

    [lead] = await admin.leads()
    assert lead["ORIGIN_ID"] == str(user_id)
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        for queue in (settings.rabbitmq_queue, settings.rabbitmq_reply_queue):
            channel = await connection.channel()
            # The broker refuses a declaration that differs: these queues are quorum queues.
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(
                    queue, durable=True, arguments={"x-queue-type": "classic"}
                )
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
