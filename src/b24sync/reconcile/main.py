"""`b24sync reconcile [--dry-run]`: where the portal's leads differ from Core's users, printed,
and the drifted users sent again.

Exit status: 0 nothing differs; 1 differences found (sent again unless it is a dry run); 2 the
check could not run (one line on stderr says what failed and which setting to check).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.bitrix.client import BitrixError
from b24sync.bitrix.main import create_client
from b24sync.core.db import create_engine, create_sessionmaker
from b24sync.core.migrate import SchemaNotReadyError, check_schema
from b24sync.core.sync.service import resync_service
from b24sync.logs import configure_logging, mask_secrets, webhook_secret
from b24sync.reconcile.leads import LeadScan
from b24sync.reconcile.report import print_report
from b24sync.reconcile.service import reconcile_service
from b24sync.settings import Settings

IN_SYNC, DRIFTED, FAILED = 0, 1, 2
# Users sent again per transaction.
RESYNC_CHUNK = 500


class ReconcileError(Exception):
    """The check could not run: what failed, and which setting to check."""


async def reconcile(settings: Settings, *, dry_run: bool, console: Console) -> int:
    """Runs the check (and the resend); returns the exit status, or raises ReconcileError."""
    engine = create_engine(settings)
    redis = Redis.from_url(settings.redis_url)
    client = create_client(settings, redis)
    try:
        await check_schema(engine)
        sessions = create_sessionmaker(engine)
        leads = await LeadScan(client, settings.originator_id).all()
        async with sessions() as session:
            report = await reconcile_service.check(session, leads, settings)
        print_report(console, report)
        if not report.found:
            return IN_SYNC
        if dry_run:
            console.print("Dry run: nothing sent.")
        elif report.drifted:
            sent = await _send_again(sessions, settings, report.drifted)
            console.print(f"Sent {sent} users again; their leads get Core's name, phone and stage.")
        return DRIFTED
    except (SchemaNotReadyError, DBAPIError, OSError, RedisError, BitrixError) as exc:
        raise ReconcileError(_explain(exc)) from exc
    finally:
        await client.aclose()
        await redis.aclose()
        await engine.dispose()


async def _send_again(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, user_ids: Sequence[int]
) -> int:
    sent = 0
    for at in range(0, len(user_ids), RESYNC_CHUNK):
        async with sessions() as session, session.begin():
            chunk = user_ids[at : at + RESYNC_CHUNK]
            # Forced: whatever version the Bitrix service last applied, the lead gets this one.
            sent += await resync_service.resync(session, settings, chunk, force=True)
    return sent


def _explain(exc: BaseException) -> str:
    if isinstance(exc, SchemaNotReadyError):
        return f"{exc} (DATABASE_URL)"
    if isinstance(exc, RedisError):
        return f"cannot use Redis ({exc}); check REDIS_URL"
    if isinstance(exc, BitrixError):
        if exc.rate_limited:
            return (
                f"Bitrix24 kept answering with its limit ({exc}); "
                "check BITRIX_RATE_BURST and BITRIX_RATE_PER_S, or try again later"
            )
        return f"Bitrix24 did not answer as expected ({exc}); check BITRIX_WEBHOOK_URL"
    reason = exc.orig if isinstance(exc, DBAPIError) else exc
    return f"cannot use the database ({reason}); check DATABASE_URL"


def run(settings: Settings, *, dry_run: bool) -> int:
    configure_logging(
        settings.log_level,
        settings.log_json,
        secrets=[secret for secret in [webhook_secret(settings.effective_webhook_url)] if secret],
        personal_data=settings.log_pii,
    )
    try:
        return asyncio.run(reconcile(settings, dry_run=dry_run, console=Console()))
    except ReconcileError as exc:
        print(f"b24sync reconcile: {mask_secrets(str(exc))}", file=sys.stderr)
        return FAILED
