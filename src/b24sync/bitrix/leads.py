"""Users as Bitrix24 leads: which lead fields a user's fields make, and the REST commands that
find, create and update leads.

A lead belongs to a user through ORIGINATOR_ID (this system) + ORIGIN_ID (the user id).
Bitrix24 enforces neither their uniqueness nor the idempotency of `crm.lead.add`, so a user
whose lead id is not known is looked up on the portal before anything is created: that is
what keeps one lead per user across retries, lost answers and a Redis that lost its data.
Look-ups are shared: one `crm.lead.list` command finds the leads of up to 50 users.

Creates go through `LeadCreator`: one `crm.lead.add` per user. A bulk mode for backfills can
put up to 20 of them into one `crm.item.batchImport` command (entityTypeId 1), joined the way
look-ups are joined, behind the same interface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from b24sync.bitrix.batch import Answer
from b24sync.bitrix.client import BitrixError
from b24sync.bitrix.transport import Command, Transport
from b24sync.contracts.messages import UserField, UserPayload
from b24sync.logs import get_logger
from b24sync.settings import Settings

log = get_logger(__name__)

# Users one look-up command asks for: one page of `crm.lead.list` answers 50 rows.
LOOKUP_USERS = 50
LOOKUP_SELECT = ["ID", "ORIGIN_ID", "PHONE"]


@dataclass(frozen=True)
class Lead:
    """A user's lead as a look-up reads it."""

    id: int
    phones: list[dict[str, Any]]

    @classmethod
    def from_row(cls, raw: dict[str, Any]) -> Lead:
        phones = raw.get("PHONE")
        return cls(
            id=int(raw["ID"]),
            phones=[p for p in phones if isinstance(p, dict)] if isinstance(phones, list) else [],
        )


def split_name(full_name: str) -> tuple[str, str]:
    """`Иван Иванов` -> (`Иван`, `Иванов`); everything after the first word is the last name."""
    first, _, rest = full_name.strip().partition(" ")
    return first, rest.strip()


def phone_entries(
    existing: list[dict[str, Any]], phone: str, value_type: str
) -> list[dict[str, Any]]:
    """PHONE for `crm.lead.update` that leaves exactly `phone` on the lead.

    An entry without ID would be appended to the old numbers, so the first existing entry is
    replaced by its ID and the others are deleted.
    """
    ids = [entry["ID"] for entry in existing if entry.get("ID")]
    if not ids:
        return [{"VALUE": phone, "VALUE_TYPE": value_type}]
    return [{"ID": ids[0], "VALUE": phone, "VALUE_TYPE": value_type}] + [
        {"ID": other, "DELETE": "Y"} for other in ids[1:]
    ]


def carried_fields(user: UserPayload) -> frozenset[UserField]:
    """The user's fields an event carries a value for."""
    return frozenset(field for field in UserField if getattr(user, field.value) is not None)


class LeadFields:
    """The lead fields that a user's fields make, as this deployment maps them."""

    def __init__(self, settings: Settings) -> None:
        self.originator_id = settings.originator_id
        self._stage_map = settings.stage_map
        self._phone_type = settings.phone_value_type

    def stage_id(self, stage: str) -> str:
        return self._stage_map.get(stage, stage)

    def of(self, user: UserPayload, fields: Collection[UserField]) -> dict[str, Any]:
        """TITLE/NAME/LAST_NAME and STATUS_ID for those of `fields` the user has a value for;
        PHONE is left to the caller (it differs between add and update)."""
        lead: dict[str, Any] = {}
        if UserField.FULL_NAME in fields and user.full_name is not None:
            name, last_name = split_name(user.full_name)
            lead.update(TITLE=user.full_name, NAME=name, LAST_NAME=last_name)
        if UserField.STAGE in fields and user.stage is not None:
            lead["STATUS_ID"] = self.stage_id(user.stage)
        return lead

    def add_params(self, user: UserPayload) -> dict[str, Any]:
        """`crm.lead.add`: every field the event carries, and the link to the user."""
        fields = self.of(user, carried_fields(user))
        fields.update(ORIGINATOR_ID=self.originator_id, ORIGIN_ID=str(user.id))
        if user.phone:
            fields["PHONE"] = [{"VALUE": user.phone, "VALUE_TYPE": self._phone_type}]
        return {"fields": fields, "params": {"REGISTER_SONET_EVENT": "Y"}}

    def update_fields(
        self, user: UserPayload, fields: Collection[UserField], lead: Lead | None
    ) -> dict[str, Any]:
        """`crm.lead.update`'s fields for `fields` only. A phone replaces the lead's phone
        entries, so it needs the `lead` as a look-up read it."""
        update = self.of(user, fields)
        if UserField.PHONE in fields and user.phone and lead is not None:
            update["PHONE"] = phone_entries(lead.phones, user.phone, self._phone_type)
        return update

    def lookup_params(self, user_ids: Collection[int], start: int = 0) -> dict[str, Any]:
        return {
            "filter": {
                "=ORIGINATOR_ID": self.originator_id,
                "@ORIGIN_ID": [str(user_id) for user_id in user_ids],
            },
            "select": LOOKUP_SELECT,
            "order": {"ID": "ASC"},
            "start": start,
        }


class _Lookup:
    """One look-up command that users join until it leaves; its pages are read to the end,
    then each user gets its leads, oldest first."""

    def __init__(self, transport: Transport, fields: LeadFields) -> None:
        self._transport = transport
        self._fields = fields
        self.user_ids: list[int] = []
        self.command = Command("crm.lead.list", build=self._first_page)
        self.leads: asyncio.Future[dict[str, list[Lead]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.reader = asyncio.create_task(self._read())

    @property
    def open(self) -> bool:
        return not self.command.departed and len(self.user_ids) < LOOKUP_USERS

    def _first_page(self) -> dict[str, Any]:
        return self._fields.lookup_params(self.user_ids)

    async def _read(self) -> None:
        try:
            found: dict[str, list[Lead]] = {}
            answer: Answer | BitrixError = await self.command.future
            while True:
                if isinstance(answer, BitrixError):
                    raise answer
                for row in answer["result"] or []:
                    found.setdefault(str(row.get("ORIGIN_ID")), []).append(Lead.from_row(row))
                start = answer.get("next")
                if start is None:
                    break
                page = self._fields.lookup_params(self.user_ids, int(start))
                answer = await self._transport.submit(Command("crm.lead.list", page))
        except BaseException as exc:
            if not self.leads.done():
                self.leads.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.leads.set_result(found)


class LeadFinder:
    """`find(user_id)`: the user's leads on the portal, oldest first. Users looked up at about
    the same time share one command."""

    def __init__(self, transport: Transport, fields: LeadFields) -> None:
        self._transport = transport
        self._fields = fields
        self._open: _Lookup | None = None

    async def find(self, user_id: int) -> list[Lead]:
        lookup = self._open
        if lookup is None or not lookup.open:
            lookup = self._open = _Lookup(self._transport, self._fields)
            self._transport.submit(lookup.command, first=True)
        lookup.user_ids.append(user_id)
        found = await asyncio.shield(lookup.leads)
        return found.get(str(user_id), [])


class LeadCreator:
    """`create(user)`: a new lead for the user, with every field the event carries."""

    def __init__(self, transport: Transport, fields: LeadFields) -> None:
        self._transport = transport
        self._fields = fields

    async def create(self, user: UserPayload) -> int:
        started = time.perf_counter()
        answer = await self._transport.call("crm.lead.add", self._fields.add_params(user))
        lead_id = int(answer["result"])
        # The time it took here (the request bucket's wait included), not Bitrix24's `time`.
        took_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info(f"[Bitrix] Created lead in Bitrix24: {lead_id}", user_id=user.id, took_ms=took_ms)
        return lead_id
