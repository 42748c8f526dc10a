"""`b24sync bitrix` at start: a broker it cannot reach or a webhook the portal rejects stop it
with one line naming the setting; a portal it cannot reach keeps it running, not ready."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydantic import SecretStr

from b24sync.bitrix.main import BitrixService
from b24sync.portal.main import PortalServer
from b24sync.settings import Settings
from tests.conftest import eventually, free_port
from tests.processes import b24sync_command

from .conftest import ServiceFactory


async def bitrix_exit(settings: Settings, cwd: Path, **env: str) -> tuple[int, str, str]:
    """Runs `b24sync bitrix` until it exits; its exit status, stdout and stderr."""
    return await b24sync_command(settings, "bitrix", cwd=cwd, **env)


async def test_an_unreachable_broker_or_redis_is_one_line(
    fast_settings: Settings, tmp_path: Path
) -> None:
    for variable, url in [
        ("RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}"),
        ("REDIS_URL", f"redis://127.0.0.1:{free_port()}"),
    ]:
        code, out, err = await bitrix_exit(fast_settings, tmp_path, **{variable: url})
        assert code == 1
        (line,) = err.splitlines()
        assert line.startswith("b24sync bitrix: cannot reach "), line
        assert line.endswith(f"(Connection refused): check {variable}"), line
        assert "Traceback" not in out + err


async def test_a_rejected_webhook_stops_the_service_naming_the_setting(
    fast_settings: Settings, portal: PortalServer, tmp_path: Path
) -> None:
    base = fast_settings.portal_webhook_url.rsplit("/", 1)[0]
    code, out, err = await bitrix_exit(
        fast_settings, tmp_path, BITRIX_WEBHOOK_URL=f"{base}/wr0ngc0de/"
    )
    assert code == 1
    assert err.splitlines() == [
        "b24sync bitrix: Bitrix24 rejected the webhook (crm.lead.fields: INVALID_CREDENTIALS: "
        "Invalid request credentials): check BITRIX_WEBHOOK_URL"
    ]
    assert "wr0ngc0de" not in out + err
    assert "Traceback" not in out + err


async def test_an_unreachable_portal_makes_the_service_not_ready_until_it_answers(
    start_service: ServiceFactory, fast_settings: Settings
) -> None:
    portal_port = free_port()
    moved = fast_settings.model_copy(update={"portal_port": portal_port})
    webhook = SecretStr(moved.portal_webhook_url)
    service: BitrixService = await start_service(bitrix_webhook_url=webhook)
    url = f"http://127.0.0.1:{fast_settings.bitrix_http_port}/readyz"
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(url)
        assert answer.status_code == 503
        reason = answer.json()["checks"]["bitrix24"]
        assert reason.startswith("Bitrix24 cannot be reached (crm.lead.fields: NETWORK_ERROR")
        assert reason.endswith("check BITRIX_WEBHOOK_URL")
        assert answer.json()["checks"]["rabbitmq"] == "ok"

        async with PortalServer(moved):

            async def ready() -> bool:
                return (await http.get(url)).status_code == 200

            await eventually(ready, wait_s=30)
    assert (await service.readiness())["bitrix24"] is True
