"""`b24sync reconcile` as an operator runs it, against Core on its database, the Bitrix service
and the emulator over HTTP; drift made by editing leads through the emulator's REST API."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.portal.main import PortalServer
from b24sync.settings import Settings
from tests.bitrix.conftest import Admin, ServiceFactory
from tests.conftest import eventually, free_port
from tests.core.helpers import running_core
from tests.processes import B24SYNC, service_environment

PHONES = ["+77001112233", "+77011234567", "+77021234567", "+77051234567", "+77071234567"]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


async def reconcile(settings: Settings, cwd: Path, *args: str, **env: str) -> Run:
    process = await asyncio.create_subprocess_exec(
        B24SYNC,
        "reconcile",
        *args,
        env=service_environment(settings, COLUMNS="200", **env),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


async def events(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int((await session.scalar(text("SELECT count(*) FROM outbox_events"))) or 0)


def leads_by_user(leads: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_user: dict[int, list[dict[str, Any]]] = {}
    for lead in leads:
        by_user.setdefault(int(lead["ORIGIN_ID"]), []).append(lead)
    return by_user


async def test_drift_is_shown_then_repaired(
    fast_settings: Settings,
    database_url: str,
    committed: async_sessionmaker[AsyncSession],
    portal: PortalServer,
    admin: Admin,
    start_service: ServiceFactory,
    tmp_path: Path,
) -> None:
    settings = fast_settings.model_copy(update={"database_url": database_url})
    await start_service()
    async with running_core(settings) as core:
        created = [
            await core.post("/users", json={"full_name": f"Иван Иванов{n}", "phone": phone})
            for n, phone in enumerate(PHONES)
        ]
        users = [response.json() for response in created]

        async def all_synced() -> bool:
            page = (await core.get("/users", params={"sync_status": "synced"})).json()
            return bool(page["pagination"]["total_count"] == len(users))

        await eventually(all_synced, wait_s=30)
        assert (await reconcile(settings, tmp_path)).code == 0

        # A salesperson's edits: a name, a second phone, a stage, a lead deleted; a lead of a
        # user Core does not have, and a second lead of user 5.
        lead = {
            n: (await core.get(f"/users/{user['id']}")).json()["bitrix_lead_id"]
            for n, user in enumerate(users, 1)
        }
        await admin.rest("crm.lead.update", {"id": lead[1], "fields": {"TITLE": "Иван Грозный"}})
        await admin.rest(
            "crm.lead.update",
            {"id": lead[2], "fields": {"PHONE": [{"VALUE": "+77009998877", "VALUE_TYPE": "WORK"}]}},
        )
        await admin.rest("crm.lead.update", {"id": lead[3], "fields": {"STATUS_ID": "JUNK"}})
        await admin.rest("crm.lead.delete", {"id": lead[4]})
        foreign = await admin.rest(
            "crm.lead.add", {"fields": {"ORIGINATOR_ID": "b24sync", "ORIGIN_ID": "999999"}}
        )
        duplicate = await admin.rest(
            "crm.lead.add",
            {"fields": {"ORIGINATOR_ID": "b24sync", "ORIGIN_ID": str(users[4]["id"])}},
        )
        edited = await admin.leads()
        before = await events(committed)

        dry = await reconcile(settings, tmp_path, "--dry-run")
        assert dry.code == 1, dry.stderr
        for shown in (
            "Иван Грозный",
            "+77009998877",
            "JUNK",
            f"#{lead[4]}",
            f"#{foreign}",
            "999999",
            f"#{duplicate}",
            "Dry run: nothing sent.",
        ):
            assert shown in dry.stdout, dry.stdout
        assert await events(committed) == before
        assert await admin.leads() == edited
        assert await all_synced()

        sent = await reconcile(settings, tmp_path)
        assert sent.code == 1, sent.stderr
        assert "Sent 4 users again" in sent.stdout

        async def repaired() -> bool:
            by_user = leads_by_user(await admin.leads())
            fresh = [by_user.get(user["id"], []) for user in users[:4]]
            return (
                all(len(leads) == 1 for leads in fresh)
                and fresh[0][0]["TITLE"] == "Иван Иванов0"
                and [phone["VALUE"] for phone in fresh[1][0]["PHONE"]] == [PHONES[1]]
                and fresh[2][0]["STATUS_ID"] == "NEW"
                and await all_synced()
            )

        await eventually(repaired, wait_s=30)
        # The lead of no user and the duplicate are for a person to judge: still reported.
        assert (await reconcile(settings, tmp_path, "--dry-run")).code == 1
        for extra in (foreign, duplicate):
            await admin.rest("crm.lead.delete", {"id": extra})
        in_sync = await reconcile(settings, tmp_path)
        assert in_sync.code == 0, in_sync.stdout
        assert "Drifted: 0 " in in_sync.stdout


async def test_a_check_that_cannot_run_says_which_setting(
    fast_settings: Settings,
    database_url: str,
    portal: PortalServer,
    tmp_path: Path,
) -> None:
    settings = fast_settings.model_copy(update={"database_url": database_url})
    wrong_code = f"{settings.portal_webhook_url.rsplit('/', 1)[0]}/wr0ng-c0de"
    for env, setting in [
        ({"REDIS_URL": f"redis://127.0.0.1:{free_port()}"}, "REDIS_URL"),
        ({"BITRIX_WEBHOOK_URL": wrong_code}, "BITRIX_WEBHOOK_URL"),
        ({"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}, "DATABASE_URL"),
    ]:
        run = await reconcile(settings, tmp_path, **env)
        assert run.code == 2, run
        (line,) = run.stderr.splitlines()
        assert line.startswith("b24sync reconcile: "), line
        assert f"check {setting}" in line, line
        assert "wr0ng-c0de" not in run.stdout + run.stderr
