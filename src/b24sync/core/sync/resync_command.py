"""`b24sync resync ID... | --failed | --all`: users sent again, straight through the database
(Core need not run; its relay publishes the events, woken by their commit), then followed
until Bitrix24 has answered for each.

Interrupted (Ctrl-C), it is resumed by running it again: every page of users is sent in a
transaction of its own, so a page is sent whole or not at all. `--failed` goes on by itself
(the users already sent are pending, no longer failed); `--all` goes on from the user id it
prints, with `--after ID`, instead of sending everyone once more. Sending a user again is
always safe: the lead ends up with the user as it is now.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console

from b24sync.contracts import MAX_ID
from b24sync.core.db import create_engine, create_sessionmaker
from b24sync.core.migrate import check_database
from b24sync.core.models import SyncStatus
from b24sync.core.sync.progress import follow_sync
from b24sync.core.sync.service import resync_service
from b24sync.core.users.repository import UserRepository
from b24sync.settings import Settings

# Exit statuses: done; done but some ids named no user; bad command line; interrupted.
OK, UNKNOWN_IDS, USAGE, INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    pass


@dataclass
class Round:
    """What a run has sent so far: the ids, in order (its last one is where `--all` resumes)."""

    sent: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)


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
    settings: Settings,
    raw_ids: Sequence[str],
    *,
    failed: bool,
    everyone: bool,
    force: bool,
    wait: bool = True,
    after: int = 0,
) -> int:
    """Returns the exit status; every problem is one line on stderr (a database that cannot
    be used raises `StartupError`, printed by the command line)."""
    try:
        if sum([bool(raw_ids), failed, everyone]) != 1:
            raise UsageError("name the users by exactly one of: ids, --failed, --all")
        if after and not everyone:
            raise UsageError("--after goes with --all")
        user_ids = parse_ids(raw_ids)
    except UsageError as exc:
        print(f"b24sync resync: {exc}", file=sys.stderr)
        return USAGE
    done = Round()
    only = SyncStatus.FAILED if failed else None
    try:
        asyncio.run(
            _resync(settings, user_ids, done, only=only, force=force, wait=wait, after=after)
        )
    except KeyboardInterrupt:
        print(f"Sent {len(done.sent)} user(s) again before the interruption.")
        if everyone and done.sent:
            print(f"`b24sync resync --all --after {done.sent[-1]}` goes on from there.")
        elif failed:
            print("`b24sync resync --failed` goes on with the users still failed.")
        return INTERRUPTED
    if done.unknown:
        print(
            f"b24sync resync: no user has id {', '.join(map(str, done.unknown))}", file=sys.stderr
        )
        return UNKNOWN_IDS
    return OK


async def _resync(
    settings: Settings,
    user_ids: list[int],
    done: Round,
    *,
    only: SyncStatus | None,
    force: bool,
    wait: bool,
    after: int,
) -> None:
    """Sends the named users in one transaction, or every (failed) user after id `after` a
    page per transaction, recording in `done` what was sent; then, with `wait`, follows them
    until Bitrix24 answered for each."""
    await check_database(settings)
    engine = create_engine(settings)
    try:
        sessions = create_sessionmaker(engine)
        if user_ids:
            async with sessions() as session, session.begin():
                known = await UserRepository(session).existing_ids(user_ids)
                await resync_service.resync(session, settings, user_ids, force=force)
            done.sent = sorted(known)
            done.unknown = sorted(set(user_ids) - set(known))
        else:
            while True:
                async with sessions() as session, session.begin():
                    page = await resync_service.resync_page(
                        session, settings, after_id=after, only=only, force=force
                    )
                if not page:
                    break
                done.sent += page
                after = page[-1]
        print(f"Sent {len(done.sent)} user(s) again{' with force' if force else ''}.")
        if wait and done.sent:
            await follow_sync(sessions, done.sent, Console())
    finally:
        await engine.dispose()
