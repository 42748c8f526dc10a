"""`b24sync resync ID... | --failed | --all`: users sent again, straight through the database
(Core need not run; its relay publishes the events, woken by their commit)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError

from b24sync.contracts import MAX_ID
from b24sync.core.db import create_engine, create_sessionmaker
from b24sync.core.migrate import SchemaNotReadyError, check_schema
from b24sync.core.models import SyncStatus
from b24sync.core.sync.service import resync_service
from b24sync.core.users.repository import UserRepository
from b24sync.settings import Settings

# Exit statuses: done; done but some ids named no user; could not run; bad command line.
OK, UNKNOWN_IDS, FAILED, USAGE = 0, 1, 1, 2


class UsageError(ValueError):
    pass


def parse_ids(raw: Sequence[str]) -> list[int]:
    ids = []
    for text in raw:
        try:
            user_id = int(text)
        except ValueError:
            raise UsageError(f"not a user id: {text!r}") from None
        if not 1 <= user_id <= MAX_ID:
            raise UsageError(f"not a user id: {text} (ids run from 1 to {MAX_ID})")
        ids.append(user_id)
    return ids


def run(
    settings: Settings, raw_ids: Sequence[str], *, failed: bool, everyone: bool, force: bool
) -> int:
    """Returns the exit status; every problem is one line on stderr."""
    try:
        if sum([bool(raw_ids), failed, everyone]) != 1:
            raise UsageError("name the users by exactly one of: ids, --failed, --all")
        user_ids = parse_ids(raw_ids)
    except UsageError as exc:
        print(f"b24sync resync: {exc}", file=sys.stderr)
        return USAGE
    try:
        sent, unknown = asyncio.run(
            _resync(settings, user_ids, only=SyncStatus.FAILED if failed else None, force=force)
        )
    except SchemaNotReadyError as exc:
        print(f"b24sync resync: {exc}", file=sys.stderr)
        return FAILED
    except (OSError, DBAPIError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        print(f"b24sync resync: cannot use the database: {reason}", file=sys.stderr)
        return FAILED
    print(f"Sent {sent} user(s) again{' with force' if force else ''}.")
    if unknown:
        print(f"b24sync resync: no user has id {', '.join(map(str, unknown))}", file=sys.stderr)
        return UNKNOWN_IDS
    return OK


async def _resync(
    settings: Settings, user_ids: list[int], *, only: SyncStatus | None, force: bool
) -> tuple[int, list[int]]:
    """Sends the named users in one transaction, or every (failed) user a page per
    transaction; returns how many were sent and the ids that named no user."""
    engine = create_engine(settings)
    try:
        await check_schema(engine)
        sessions = create_sessionmaker(engine)
        if user_ids:
            async with sessions() as session, session.begin():
                known = await UserRepository(session).existing_ids(user_ids)
                sent = await resync_service.resync(session, settings, user_ids, force=force)
            return sent, sorted(set(user_ids) - set(known))
        total, after_id = 0, 0
        while True:
            async with sessions() as session, session.begin():
                sent, last_id = await resync_service.resync_page(
                    session, settings, after_id=after_id, only=only, force=force
                )
            if last_id is None:
                return total, []
            total, after_id = total + sent, last_id
    finally:
        await engine.dispose()
