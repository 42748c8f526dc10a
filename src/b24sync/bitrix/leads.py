"""Users as Bitrix24 leads: field mapping, finding a user's lead, and the upsert of one event.

A lead belongs to a user through ORIGINATOR_ID (this system) + ORIGIN_ID (the user id). Bitrix24
enforces neither uniqueness nor idempotency of `crm.lead.add`, so every write first looks the lead
up on the portal: that is what keeps one lead per user across retries, timeouts and lost caches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from b24sync.bitrix.client import BitrixCalls, BitrixError
from b24sync.contracts.messages import Action, UserPayload
from b24sync.logs import get_logger
from b24sync.settings import Settings

log = get_logger(__name__)

_LOOKUP_SELECT = ["ID", "ORIGINATOR_ID", "ORIGIN_ID", "PHONE"]


@dataclass(frozen=True)
class Lead:
    id: int
    originator_id: str
    origin_id: str
    phones: list[dict[str, Any]]

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> Lead:
        phones = raw.get("PHONE")
        return cls(
            id=int(raw["ID"]),
            originator_id=str(raw.get("ORIGINATOR_ID") or ""),
            origin_id=str(raw.get("ORIGIN_ID") or ""),
            phones=[p for p in phones if isinstance(p, dict)] if isinstance(phones, list) else [],
        )


@dataclass(frozen=True)
class SyncResult:
    lead_id: int
    created: bool


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


class Leads:
    def __init__(self, client: BitrixCalls, settings: Settings) -> None:
        self._client = client
        self._originator_id = settings.originator_id
        self._stage_map = settings.stage_map
        self._phone_type = settings.phone_value_type

    def stage_id(self, stage: str) -> str:
        return self._stage_map.get(stage, stage)

    def fields(self, user: UserPayload) -> dict[str, Any]:
        """The lead fields a user determines, except PHONE (which differs for add and update)."""
        fields: dict[str, Any] = {
            "ORIGINATOR_ID": self._originator_id,
            "ORIGIN_ID": str(user.id),
        }
        if user.full_name is not None:
            name, last_name = split_name(user.full_name)
            fields.update(TITLE=user.full_name, NAME=name, LAST_NAME=last_name)
        if user.stage is not None:
            fields["STATUS_ID"] = self.stage_id(user.stage)
        return fields

    async def sync(self, action: Action, user: UserPayload, known_ids: Iterable[int]) -> SyncResult:
        """Makes the user's lead reflect the event; creates it when the user has none yet
        (whatever the action: an update may arrive before its create)."""
        lead = await self.find(user.id, known_ids)
        if lead is not None:
            if action is Action.CREATE_CARD:
                # A retried create whose add went through, or an update that came first.
                log.info(f"[Bitrix] Lead {lead.id} of user {user.id} already exists; updating it")
            try:
                await self.update(lead, action, user)
                return SyncResult(lead.id, created=False)
            except BitrixError as err:
                if not err.not_found:
                    raise
                log.warning(f"[Bitrix] Lead {lead.id} is gone from Bitrix24, creating it again")
        return SyncResult(await self.add(user), created=True)

    async def find(self, user_id: int, known_ids: Iterable[int]) -> Lead | None:
        """The user's lead: first by ids we were told or remember, then by ORIGIN_ID on the
        portal, which stays the truth when the ids are stale or the cache is lost."""
        for lead_id in dict.fromkeys(known_ids):
            try:
                raw = await self._client.call("crm.lead.get", {"id": lead_id})
            except BitrixError as err:
                if err.not_found:
                    continue
                raise
            lead = Lead.from_api(raw)
            # A lead linked to another user of ours is not this user's, whatever the id said.
            if lead.originator_id == self._originator_id and lead.origin_id != str(user_id):
                continue
            return lead
        rows = await self._client.call(
            "crm.lead.list",
            {
                "filter": {"=ORIGINATOR_ID": self._originator_id, "=ORIGIN_ID": str(user_id)},
                "select": _LOOKUP_SELECT,
                "order": {"ID": "ASC"},
            },
        )
        if not rows:
            return None
        if len(rows) > 1:
            log.warning(
                f"[Bitrix] {len(rows)} leads carry user {user_id}; using the oldest, "
                f"{rows[0]['ID']}"
            )
        return Lead.from_api(rows[0])

    async def add(self, user: UserPayload) -> int:
        fields = self.fields(user)
        if user.phone:
            fields["PHONE"] = [{"VALUE": user.phone, "VALUE_TYPE": self._phone_type}]
        answer = await self._client.request(
            "crm.lead.add", {"fields": fields, "params": {"REGISTER_SONET_EVENT": "Y"}}
        )
        log.info(
            "[Bitrix] Created lead in Bitrix24: "
            + json.dumps(
                {"result": answer["result"], "time": answer.get("time")}, ensure_ascii=False
            )
        )
        return int(answer["result"])

    async def update(self, lead: Lead, action: Action, user: UserPayload) -> None:
        if action is Action.MOVE_CARD:
            # A move touches the stage only: names and phones of the event may be outdated.
            fields = {k: v for k, v in self.fields(user).items() if k == "STATUS_ID"}
        else:
            fields = self.fields(user)
            if user.phone:
                fields["PHONE"] = phone_entries(lead.phones, user.phone, self._phone_type)
        await self._client.call("crm.lead.update", {"id": lead.id, "fields": fields})
        log.info(f"[Bitrix] Updated lead {lead.id} in Bitrix24 ({action.value})")
