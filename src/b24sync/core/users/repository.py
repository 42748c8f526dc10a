"""All SQL on the users table, and the statements that write users and their events together:
new users with their first events, changed users with their new events, and on the reply path
a user's event read and answered in the same statement as the user."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    Interval,
    Table,
    Text,
    Uuid,
    and_,
    any_,
    bindparam,
    func,
    inspect,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import configure_mappers
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.selectable import Select

from b24sync.batching import Coalescer
from b24sync.contracts import UserField
from b24sync.core.db import Statements, driver_of, one_item_to_blame
from b24sync.core.models import AnswerStatus, OutboxEvent, SyncStatus, User
from b24sync.core.outbox.repository import (
    ANSWERED_EVENT_COLUMNS,
    NOTIFY_CHANNEL,
    RECORD_ANSWER,
    WAKE_RELAYS,
    AnsweredEvent,
    answer_parameters,
    answered_event,
    event_parameters,
    inserted_events,
    superseding_held,
)
from b24sync.core.outbox.service import EventDraft

_USERS = cast(Table, User.__table__)
_USER_COLUMNS = [column.name for column in _USERS.columns]
# A change, or the success of its latest version, starts the sync state afresh: no error, no
# retry waiting or counted.
FRESH_SYNC_STATE: dict[str, Any] = {
    "sync_error": None,
    "sync_error_code": None,
    "sync_retryable": None,
    "sync_attempts": 0,
    "sync_retries": 0,
    "next_sync_at": None,
}
# Users and their `user_created` events (version 1), any number in one statement; the relay is
# woken once.
# Ids are drawn up front so each event can carry its user's id and each row find its caller.
# The statement goes straight through the driver (asyncpg's prepared-statement cache): on the
# hottest path SQLAlchemy's statement execution cost more CPU than the round trip itself.
# NOTIFY is delivered on commit only.
_INSERT_WITH_EVENTS = """
WITH input AS (
    SELECT nextval(pg_get_serial_sequence('users', 'id')) AS id, item.*
    FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[])
        WITH ORDINALITY AS item (full_name, phone, stage, event_id, pattern, body, position)
), new_users AS (
    INSERT INTO users (id, full_name, phone, stage)
    SELECT id, full_name, phone, stage FROM input ORDER BY position
    RETURNING *
), events AS (
    INSERT INTO outbox_events (id, user_id, pattern, version, body)
    SELECT event_id, id, pattern, 1, jsonb_set(body::jsonb, '{data,user,id}', to_jsonb(id))
    FROM input ORDER BY position
), wake AS (
    SELECT pg_notify($7, '')
)
SELECT new_users.* FROM new_users JOIN input USING (id) CROSS JOIN wake
ORDER BY input.position
"""
# Rows of one grouped statement: large enough for any burst, small enough for one round trip.
MAX_GROUP = 100


@dataclass(frozen=True, slots=True)
class NewUser:
    full_name: str
    phone: str
    stage: str
    event: EventDraft


async def _insert_with_events(driver: asyncpg.Connection, users: Sequence[NewUser]) -> list[Any]:
    """Runs the insert on `driver`: in its transaction when one is open, otherwise as a
    transaction of its own. A single statement is atomic either way."""
    rows: list[Any] = await driver.fetch(
        _INSERT_WITH_EVENTS,
        [user.full_name for user in users],
        [user.phone for user in users],
        [user.stage for user in users],
        [user.event.id for user in users],
        [user.event.pattern.value for user in users],
        [json.dumps(user.event.body, ensure_ascii=False) for user in users],
        NOTIFY_CHANNEL,
    )
    return rows


def grouped_creates(pool: asyncpg.Pool, in_flight: int) -> Coalescer[NewUser, User]:
    """Creates from concurrent requests, written together: one statement and one commit for
    the whole group instead of one each, which is most of what a create costs Core and
    PostgreSQL. Each caller still answers only after its own row is committed."""

    async def insert(users: list[NewUser]) -> list[User]:
        async with pool.acquire() as driver:
            return [user_from_row(row) for row in await _insert_with_events(driver, users)]

    return Coalescer(
        insert, max_in_flight=in_flight, max_items=MAX_GROUP, retry_alone=one_item_to_blame
    )


# Built once: building a statement cost more CPU than running it, on the API's write path and
# the reply path. Updates are on the table, not the entity: the ORM's bulk-update machinery
# cost more CPU than the statement.
_SELECT_USER = select(User).where(User.id == bindparam("user_id"))
# Users locked in id order, each with the event a reply names when it is that user's.
_WANTED = (
    func.unnest(
        bindparam("user_ids", type_=ARRAY(BigInteger)), bindparam("event_ids", type_=ARRAY(Uuid))
    )
    .table_valued("user_id", "event_id")
    .render_derived(name="wanted")
)
_SELECT_USERS_WITH_EVENTS = (
    select(User, *ANSWERED_EVENT_COLUMNS)
    .join_from(User, _WANTED, User.id == _WANTED.c.user_id)
    .outerjoin(
        OutboxEvent,
        and_(OutboxEvent.id == _WANTED.c.event_id, OutboxEvent.user_id == User.id),
    )
    .order_by(User.id)
    .with_for_update(of=User)
)


# The fields an update or a move can change.
CHANGEABLE = tuple(field.value for field in UserField)
# The columns a change sets from what it computed (`change_users`): the fields, and versions.
VERSION_COLUMNS = ("version", *(f"{field}_version" for field in CHANGEABLE))
CHANGED_COLUMNS = (*CHANGEABLE, *VERSION_COLUMNS)
# PostgreSQL's version of a row (the transaction that wrote it): a change is computed from a
# row known and written only over that same row.
_ROW_VERSION = literal_column("users.xmin").cast(Text)
_ROW_KEYS = (*_USER_COLUMNS, "row_version")
# The group's users, locked in id order whatever plan runs the UPDATE: two groups of changes, or
# a group of changes and a group of replies, naming the same users wait for each other instead
# of deadlocking. FOR UPDATE gives each row's latest version, also one committed after the
# statement began.
_LOCKED = (
    select(_USERS, _ROW_VERSION.label("row_version"))
    .where(_USERS.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
    .order_by(_USERS.c.id)
    .with_for_update()
    .cte("locked")
)
_CHANGED = (
    func.unnest(
        bindparam("changed_ids", type_=ARRAY(BigInteger)),
        bindparam("row_versions", type_=ARRAY(Text)),
        *(bindparam(f"new_{field}", type_=ARRAY(Text)) for field in CHANGEABLE),
        *(bindparam(f"new_{column}", type_=ARRAY(Integer)) for column in VERSION_COLUMNS),
    )
    .table_valued("id", "row_version", *CHANGED_COLUMNS)
    .render_derived(name="change")
)
_WRITTEN = (
    update(_USERS)
    .where(
        _USERS.c.id == _LOCKED.c.id,
        _USERS.c.id == _CHANGED.c.id,
        _CHANGED.c.row_version == _ROW_VERSION,
    )
    .values(
        **{column: _CHANGED.c[column] for column in CHANGED_COLUMNS},
        sync_status=SyncStatus.PENDING.value,
        updated_at=func.now(),
        **FRESH_SYNC_STATE,
    )
    .returning(_USERS.c.id, _USERS.c.updated_at, _ROW_VERSION.label("row_version"))
    .cte("written")
)
_HELD_BACK = superseding_held(
    and_(
        OutboxEvent.user_id == _WRITTEN.c.id,
        _WRITTEN.c.id == any_(bindparam("held_ids", type_=ARRAY(BigInteger))),
    )
).cte("held_back")
# Users changed from the rows known, each only if its row is still the one known, with the
# events of those written, the relays woken if any was; every user named as it is now (written:
# when, and its new row version). The variant with the held-back events of some of them
# superseded runs only when there are such users.
_CHANGE_USERS = (
    select(
        _WRITTEN.c.id,
        _WRITTEN.c.updated_at.label("written_at"),
        _WRITTEN.c.row_version.label("written_version"),
        # Evaluated once, and only when a user was written.
        select(WAKE_RELAYS).scalar_subquery().label("relays_woken"),
        *(null().label(column) for column in _ROW_KEYS[1:]),
    )
    .union_all(
        select(
            _LOCKED.c.id,
            null(),
            null(),
            null(),
            *(_LOCKED.c[column] for column in _ROW_KEYS[1:]),
        ).where(_LOCKED.c.id.not_in(select(_WRITTEN.c.id)))
    )
    .add_cte(inserted_events(select(_WRITTEN.c.id)))
)
_CHANGE_USERS_SUPERSEDING_HELD = _CHANGE_USERS.add_cte(_HELD_BACK)


@dataclass(frozen=True, slots=True)
class ChangedUsers:
    """What `change_users` did: when each user written was written, with its new row version;
    each other user named as it is now (its columns and `row_version`)."""

    written: dict[int, tuple[datetime, str]]
    current: dict[int, dict[str, Any]]


async def change_users(
    statements: Statements,
    user_ids: Sequence[int],
    changed: Sequence[dict[str, Any]],
    events: Sequence[tuple[int, EventDraft]],
    held: Sequence[int],
) -> ChangedUsers:
    """In one statement: writes the users `changed` (rows computed from rows known, each with
    the known row's `row_version`) whose rows are still the ones known, with their events, and,
    for those in `held`, their held-back events superseded; reads every other user of
    `user_ids`. A user named but not found does not exist. The users are locked in id order,
    until the transaction ends when there is one."""
    parameters: dict[str, Any] = {
        "ids": list(user_ids),
        "changed_ids": [user["id"] for user in changed],
        "row_versions": [user["row_version"] for user in changed],
        **{f"new_{column}": [user[column] for user in changed] for column in CHANGED_COLUMNS},
        **event_parameters(events),
    }
    if held:
        parameters["held_ids"] = list(held)
    rows = await statements.rows(
        _CHANGE_USERS_SUPERSEDING_HELD if held else _CHANGE_USERS, parameters
    )
    outcome = ChangedUsers({}, {})
    for row in rows:
        if row["written_version"] is None:
            outcome.current[row["id"]] = {key: row[key] for key in _ROW_KEYS}
        else:
            outcome.written[row["id"]] = (row["written_at"], row["written_version"])
    return outcome


@dataclass(frozen=True, slots=True)
class DatabaseNow:
    """A timestamp to write: the database's clock when the statement runs, `after` later."""

    after: timedelta = timedelta(0)


@functools.cache
def _sync_state_statement(plain: frozenset[str], clock: frozenset[str]) -> Update:
    """The sync-state UPDATE of `record_reply` for one set of columns: values bound as
    `new_<column>`, those in `clock` as an interval after the database's now()."""
    return (
        update(_USERS)
        .where(_USERS.c.id == bindparam("reply_user_id"))
        .values(
            **{key: bindparam(f"new_{key}") for key in plain},
            **{key: func.now() + bindparam(f"new_{key}", type_=Interval) for key in clock},
        )
    )


# Other users' waiting retries made due now (see `record_reply`).
_PULL_RETRIES_FORWARD = (
    update(_USERS)
    .where(
        _USERS.c.id.in_(
            select(_USERS.c.id)
            .where(
                _USERS.c.id != bindparam("reply_user_id"),
                _USERS.c.next_sync_at > func.now(),
                _USERS.c.sync_failed_at
                < func.coalesce(
                    bindparam("failed_before", type_=DateTime(timezone=True)), func.now()
                ),
            )
            .order_by(_USERS.c.next_sync_at)
            .limit(bindparam("limit", type_=Integer))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(next_sync_at=func.now())
    .returning(_USERS.c.id)
)


@dataclass(frozen=True, slots=True)
class Answer:
    """An event's answer to record."""

    event_id: UUID
    status: AnswerStatus
    reason: str | None


@dataclass(frozen=True, slots=True)
class PullRetries:
    """Retries to make due now: up to `limit` of users that failed before `failed_before`
    (now when None)."""

    failed_before: datetime | None
    limit: int


@functools.cache
def _reply_statement(
    plain: frozenset[str], clock: frozenset[str], answer: bool, pull: bool
) -> Select[Any]:
    """What a reply teaches, written in one statement: the event's answer, the user's sync
    state and the retries pulled forward, each a CTE when there is one; it returns how many
    retries were pulled. PostgreSQL runs every data-modifying CTE, referenced or not.

    The user's id is bound as `reply_user_id`: a parameter named like a column of a table an
    UPDATE writes (`outbox_events.user_id`) would be taken by SQLAlchemy as a value to set."""
    ctes = []
    if answer:
        ctes.append(RECORD_ANSWER.returning(OutboxEvent.__table__.c.id).cte("answer"))
    if plain or clock:
        ctes.append(_sync_state_statement(plain, clock).returning(_USERS.c.id).cte("state"))
    if pull:
        statement = select(func.count()).select_from(_PULL_RETRIES_FORWARD.cte("pulled"))
    else:
        statement = select(literal_column("0"))
    return statement.add_cte(*ctes)


# The constructor configures the mappers on first use; this path does not go through it.
configure_mappers()
_NEW_USER = inspect(User).class_manager.new_instance


def user_from_row(row: Any) -> User:
    """A `User` (not in the session) from a row that has every column of the table. Filled the
    way the ORM's loader fills what it reads, not through the constructor: the constructor's
    attribute events cost several times what the rest of a write does with the user."""
    user = _NEW_USER()
    user.__dict__.update({column: row[column] for column in _USER_COLUMNS})
    return user


def _matches(search: str) -> ColumnElement[bool]:
    """Users whose name holds `search` in any case, or whose phone holds its digits."""
    conditions = [User.full_name.icontains(search, autoescape=True)]
    digits = re.sub(r"\D", "", search)
    if digits:
        conditions.append(User.phone.contains(digits, autoescape=True))
    return or_(*conditions)


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create_many(self, users: Sequence[NewUser]) -> list[User]:
        """Inserts the users and their `user_created` events in one statement on the session's
        connection, inside its transaction when one is open (a single statement is atomic
        either way); only the user ids, assigned by that statement, are written into the
        events by the database."""
        async with driver_of(await self.session.connection()) as driver:
            rows = await _insert_with_events(driver, users)
        return [user_from_row(row) for row in rows]

    async def get(self, user_id: int) -> User | None:
        result = await self.session.scalars(
            _SELECT_USER, {"user_id": user_id}, execution_options={"populate_existing": True}
        )
        return result.one_or_none()

    async def get_with_events(
        self, wanted: Sequence[tuple[int, UUID | None]]
    ) -> dict[int, tuple[User, AnsweredEvent | None]]:
        """The users named (each once), locked in id order, each with the event named with
        it (None when that is not the user's event); a user that does not exist is left out.
        One round trip for a group of replies."""
        result = await self.session.execute(
            _SELECT_USERS_WITH_EVENTS,
            {
                "user_ids": [user_id for user_id, _ in wanted],
                "event_ids": [event_id for _, event_id in wanted],
            },
            execution_options={"populate_existing": True},
        )
        found: dict[int, tuple[User, AnsweredEvent | None]] = {}
        for row in result:
            event = answered_event(row[1:]) if row[1] is not None else None
            found[row[0].id] = (row[0], event)
        return found

    async def record_reply(
        self,
        user_id: int,
        values: dict[str, Any],
        *,
        answer: Answer | None = None,
        pull_retries: PullRetries | None = None,
    ) -> int:
        """Records what Bitrix24 answered, in one statement: the user's sync state `values`
        (never the user's own data or version; a `DatabaseNow` value is the database's clock
        when the statement runs), the event's `answer`, and with `pull_retries` other users'
        waiting retries made due now. Returns how many retries were pulled forward."""
        clock = frozenset(key for key, value in values.items() if isinstance(value, DatabaseNow))
        parameters: dict[str, Any] = {
            f"new_{key}": value.after if key in clock else value for key, value in values.items()
        }
        parameters["reply_user_id"] = user_id
        if answer is not None:
            parameters.update(answer_parameters(answer.event_id, answer.status, answer.reason))
        if pull_retries is not None:
            parameters.update(failed_before=pull_retries.failed_before, limit=pull_retries.limit)
        statement = _reply_statement(
            frozenset(values) - clock, clock, answer is not None, pull_retries is not None
        )
        return int(await self.session.scalar(statement, parameters) or 0)

    async def lock_many(self, user_ids: Sequence[int]) -> Sequence[User]:
        """The users that exist among `user_ids`, locked, in id order (so that two callers
        locking overlapping sets wait for each other instead of deadlocking)."""
        result = await self.session.scalars(
            select(User).where(User.id.in_(user_ids)).order_by(User.id).with_for_update(),
            execution_options={"populate_existing": True},
        )
        return result.all()

    async def mark_sent_again(self, user_ids: Sequence[int], *, retry: bool, force: bool) -> None:
        """The users were sent again (a new event each): pending until that event's answer. A
        retry counts; a resync starts the count afresh. The last error stays on show. A forced
        restatement stays forced until a success."""
        values: dict[str, Any] = {
            "sync_status": SyncStatus.PENDING.value,
            "next_sync_at": None,
            "sync_retries": User.sync_retries + 1 if retry else 0,
        }
        if force:
            values["sync_force"] = True
        await self.session.execute(update(User).where(User.id.in_(user_ids)).values(**values))

    async def lock_retries(self, limit: int, *, due: bool = True) -> Sequence[int]:
        """Up to `limit` users whose retry is due (or, with `due=False`, whose retry waits at
        all), earliest first; locked, skipping users locked by someone else."""
        statement = (
            select(User.id)
            .where(User.next_sync_at.is_not(None))
            .order_by(User.next_sync_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if due:
            statement = statement.where(User.next_sync_at <= func.now())
        return (await self.session.scalars(statement)).all()

    async def existing_ids(self, user_ids: Sequence[int]) -> Sequence[int]:
        """The ids among `user_ids` that name a user."""
        return (await self.session.scalars(select(User.id).where(User.id.in_(user_ids)))).all()

    async def ids_by_name_and_phone(self, phones: Sequence[str]) -> dict[tuple[str, str], int]:
        """The users that have one of `phones`, by (full name, phone); the lowest id of each."""
        rows = await self.session.execute(
            select(User.full_name, User.phone, func.min(User.id))
            .where(User.phone == any_(bindparam("phones", list(phones), type_=ARRAY(Text))))
            .group_by(User.full_name, User.phone)
        )
        return {(name, phone): user_id for name, phone, user_id in rows}

    async def count_by_sync_status_of(self, user_ids: Sequence[int]) -> dict[str, int]:
        """How many of the users `user_ids` are in each sync status."""
        ids = bindparam("ids", list(user_ids), type_=ARRAY(BigInteger))
        rows = await self.session.execute(
            select(User.sync_status, func.count())
            .where(User.id == any_(ids))
            .group_by(User.sync_status)
        )
        return {status: count for status, count in rows}

    async def page_of_ids(
        self, after_id: int, limit: int, *, sync_status: SyncStatus | None = None
    ) -> Sequence[int]:
        """The next `limit` user ids after `after_id` in id order (of that status when given):
        whole tables read in pages."""
        statement = select(User.id).where(User.id > after_id).order_by(User.id).limit(limit)
        if sync_status is not None:
            statement = statement.where(User.sync_status == sync_status.value)
        return (await self.session.scalars(statement)).all()

    async def page(self, after_id: int, limit: int) -> Sequence[User]:
        """The next `limit` users after `after_id` in id order: the whole table read in pages."""
        statement = select(User).where(User.id > after_id).order_by(User.id).limit(limit)
        return (await self.session.scalars(statement)).all()

    async def count_by_sync_status(self) -> dict[str, tuple[int, float | None]]:
        """For each sync status: how many users, and how long ago (seconds, by the database's
        clock) the least recently changed of them changed."""
        rows = await self.session.execute(
            select(
                User.sync_status,
                func.count(),
                func.extract("epoch", func.now() - func.min(User.updated_at)),
            ).group_by(User.sync_status)
        )
        return {
            status: (count, float(age) if age is not None else None) for status, count, age in rows
        }

    async def failures(self) -> tuple[int, int, float | None]:
        """Failed users whose retry waits or is due, and those that wait for a change or a
        resync; and in how many seconds the next retry is due (negative when overdue)."""
        retrying, permanent = (
            await self.session.execute(
                select(
                    func.count().filter(User.sync_retryable.is_(True)),
                    func.count().filter(User.sync_retryable.is_not(True)),
                ).where(User.sync_status == SyncStatus.FAILED.value)
            )
        ).one()
        next_in_s = await self.session.scalar(
            select(func.extract("epoch", func.min(User.next_sync_at) - func.now())).where(
                User.next_sync_at.is_not(None)
            )
        )
        return retrying, permanent, float(next_in_s) if next_in_s is not None else None

    async def list(
        self,
        *,
        stage: str | None,
        sync_status: str | None,
        limit: int,
        offset: int,
        search: str | None = None,
    ) -> tuple[Sequence[User], int]:
        """A page of users in id order, with how many match; `search` matches a part of the
        name (any case) or, when it holds digits, a part of the phone's digits."""
        filters: list[ColumnElement[bool]] = []
        if stage is not None:
            filters.append(User.stage == stage)
        if sync_status is not None:
            filters.append(User.sync_status == sync_status)
        if search:
            filters.append(_matches(search))
        total = await self.session.scalar(select(func.count()).select_from(User).where(*filters))
        rows = await self.session.scalars(
            select(User).where(*filters).order_by(User.id).limit(limit).offset(offset)
        )
        return rows.all(), total or 0
