"""What `b24sync users list|show` print, through the same services as the API."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from rich.console import Console
from rich.table import Table
from rich.text import Text

from b24sync.core.command_session import command_session
from b24sync.core.models import OutboxEvent, SyncStatus, User
from b24sync.core.users.schemas import UserEvent
from b24sync.core.users.service import UserNotFoundError, user_service
from b24sync.settings import Settings

HISTORY_SHOWN = 20
STATE_STYLES = {"pending": "yellow", "synced": "green", "failed": "red"}


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "–"


def state_text(status: str) -> Text:
    return Text(status, style=STATE_STYLES.get(status, ""))


def failure_text(user: User) -> str:
    """The last error, its code, and how it is being handled."""
    if user.sync_error is None:
        return ""
    code = f" ({user.sync_error_code})" if user.sync_error_code else ""
    kind = "retrying" if user.sync_retryable else "permanent"
    return f"{user.sync_error}{code} · {kind}, {user.sync_attempts} attempt(s)"


def list_users(
    settings: Settings, *, status: SyncStatus | None, search: str | None, limit: int
) -> int:
    users, total, _ = asyncio.run(_list(settings, status, search, limit))
    table = Table("id", "name", "phone", "stage", "sync", "lead", "last error")
    for user in users:
        table.add_row(
            str(user.id),
            user.full_name,
            user.phone,
            user.stage,
            state_text(user.sync_status),
            str(user.bitrix_lead_id or "–"),
            failure_text(user),
        )
    console = Console()
    console.print(table)
    console.print(f"{len(users)} of {total} user(s)")
    return 0


async def _list(
    settings: Settings, status: SyncStatus | None, search: str | None, limit: int
) -> tuple[list[User], int, int]:
    async with command_session(settings) as session:
        return await user_service.list(
            session, stage=None, sync_status=status, page=1, limit=limit, search=search
        )


def show_user(settings: Settings, user_id: int) -> int:
    try:
        user, events = asyncio.run(_show(settings, user_id))
    except UserNotFoundError as exc:
        print(f"b24sync users show: {exc}", file=sys.stderr)
        return 1
    console = Console()
    fields = Table.grid(padding=(0, 2))
    fields.add_row("id", str(user.id))
    fields.add_row("name", user.full_name)
    fields.add_row("phone", user.phone)
    fields.add_row("stage", user.stage)
    fields.add_row("version", str(user.version))
    fields.add_row("lead", str(user.bitrix_lead_id or "–"))
    fields.add_row("sync", state_text(user.sync_status))
    fields.add_row("synced version", str(user.synced_version or "–"))
    fields.add_row("synced at", _when(user.synced_at))
    if user.sync_error is not None:
        fields.add_row("last error", failure_text(user))
        fields.add_row("failed at", _when(user.sync_failed_at))
        fields.add_row("next retry", _when(user.next_sync_at))
    console.print(fields)
    history = Table("when", "change", "version", "fields", "published", "answer", title="History")
    for event in map(UserEvent.from_event, events):
        changed = event.changed or list(event.sent)
        answer = Text(event.answer_status or "waiting", style=_answer_style(event.answer_status))
        if event.answer_reason:
            answer.append(f": {event.answer_reason}")
        history.add_row(
            _when(event.created_at),
            event.pattern,
            str(event.version),
            ", ".join(f"{field}={event.sent[field]}" for field in changed if field in event.sent),
            _when(event.published_at),
            answer,
        )
    console.print(history)
    return 0


def _answer_style(status: str | None) -> str:
    return {"success": "green", "error": "red"}.get(status or "", "yellow")


async def _show(settings: Settings, user_id: int) -> tuple[User, list[OutboxEvent]]:
    async with command_session(settings) as session:
        user = await user_service.get(session, user_id)
        return user, list(await user_service.history(session, user_id, HISTORY_SHOWN))
