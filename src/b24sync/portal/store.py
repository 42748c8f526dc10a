"""The portal's leads: kept in memory, optionally written through to a SQLite file.

Leads are stored exactly as `crm.lead.get` returns them (string values, multi-field lists), so
reading is a copy. With a state file every change is written through, and the file is read back
on open: the portal's data survives a restart.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from b24sync.portal.fields import (
    MULTI_FIELDS,
    MULTI_VALUE_TYPES,
    SCALAR_FIELDS,
    USER_FIELD_PREFIX,
    WRITABLE_FIELDS,
    stage_semantic_id,
)
from b24sync.portal.params import as_int, as_list

Lead = dict[str, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leads (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class _Unset:
    """Marks a value a portal silently drops (a list given for a scalar field)."""


_DROP = _Unset()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _scalar(value: Any) -> str | _Unset | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, int | float):
        return str(value)
    return _DROP


class LeadStore:
    def __init__(self, state_file: str | None, user_id: str) -> None:
        self._state_file = state_file
        self._user_id = user_id
        self._leads: dict[int, Lead] = {}
        # Lead ids by ORIGIN_ID: a look-up by the external id reads only its own leads.
        self._by_origin: dict[str, set[int]] = {}
        self._next_lead_id = 1
        self._next_multi_id = 1
        self._db: aiosqlite.Connection | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._state_file is None or self._db is not None:
            return
        self._db = await aiosqlite.connect(self._state_file)
        await self._db.executescript(_SCHEMA)
        async with self._db.execute("SELECT id, body FROM leads") as cursor:
            async for lead_id, body in cursor:
                self._leads[int(lead_id)] = json.loads(body)
                self._index(int(lead_id), None)
        async with self._db.execute("SELECT name, value FROM counters") as cursor:
            counters = {name: int(value) async for name, value in cursor}
        self._next_lead_id = counters.get("lead", max(self._leads, default=0) + 1)
        self._next_multi_id = counters.get("multi", 1)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def clear(self) -> None:
        self._leads.clear()
        self._by_origin.clear()
        self._next_lead_id = 1
        self._next_multi_id = 1
        if self._db is not None:
            await self._db.execute("DELETE FROM leads")
            await self._db.execute("DELETE FROM counters")
            await self._db.commit()

    # --- reads --------------------------------------------------------------------------

    def get(self, lead_id: int) -> Lead | None:
        lead = self._leads.get(lead_id)
        return copy.deepcopy(lead) if lead is not None else None

    def all(self) -> list[Lead]:
        """Every lead, ordered by ID."""
        return [copy.deepcopy(lead) for lead in self.scan()]

    def scan(self) -> Iterator[Lead]:
        """Every lead, ordered by ID, as stored: to read, never to change or hand out. A search
        copies only what it answers with, not every lead it looks at."""
        return (self._leads[lead_id] for lead_id in sorted(self._leads))

    def with_origin(self, origin_ids: Iterable[str]) -> Iterator[Lead]:
        """The leads whose ORIGIN_ID is one of `origin_ids`, ordered by ID, as stored (like
        `scan`)."""
        found: set[int] = set()
        for origin_id in origin_ids:
            found |= self._by_origin.get(origin_id, set())
        return (self._leads[lead_id] for lead_id in sorted(found))

    # --- writes -------------------------------------------------------------------------

    async def add(self, fields: dict[str, Any]) -> int:
        lead_id = self._next_lead_id
        self._next_lead_id += 1
        now = _now_iso()
        lead: Lead = dict.fromkeys(SCALAR_FIELDS)
        lead.update(
            ID=str(lead_id),
            STATUS_ID="NEW",
            OPENED="Y",
            CURRENCY_ID="USD",
            OPPORTUNITY="0.00",
            IS_MANUAL_OPPORTUNITY="N",
            IS_RETURN_CUSTOMER="N",
            HAS_IMOL="N",
            ASSIGNED_BY_ID=self._user_id,
            CREATED_BY_ID=self._user_id,
            DATE_CREATE=now,
        )
        self._apply(lead, fields, now, creating=True)
        if not lead["TITLE"]:
            lead["TITLE"] = f"Lead #{lead_id}"
        self._leads[lead_id] = lead
        self._index(lead_id, None)
        await self._persist(lead_id)
        return lead_id

    async def update(self, lead_id: int, fields: dict[str, Any]) -> bool:
        lead = self._leads.get(lead_id)
        if lead is None:
            return False
        origin_id = lead.get("ORIGIN_ID")
        self._apply(lead, fields, _now_iso(), creating=False)
        self._index(lead_id, origin_id)
        await self._persist(lead_id)
        return True

    async def delete(self, lead_id: int) -> bool:
        lead = self._leads.get(lead_id)
        if lead is None:
            return False
        self._index(lead_id, lead.get("ORIGIN_ID"), removed=True)
        del self._leads[lead_id]
        if self._db is not None:
            await self._db.execute("DELETE FROM leads WHERE id = ?", (lead_id,))
            await self._db.commit()
        return True

    def _index(self, lead_id: int, previous: str | None, *, removed: bool = False) -> None:
        """Keeps the ORIGIN_ID index right after a lead got (`previous`: had) its ORIGIN_ID."""
        current = None if removed else self._leads[lead_id].get("ORIGIN_ID")
        if previous is not None:
            self._by_origin.get(previous, set()).discard(lead_id)
        if current is not None:
            self._by_origin.setdefault(current, set()).add(lead_id)

    def _apply(self, lead: Lead, fields: dict[str, Any], now: str, *, creating: bool) -> None:
        """Writes the known writable fields; a portal silently drops everything else."""
        previous_stage = None if creating else lead["STATUS_ID"]
        for key, value in fields.items():
            name = str(key).upper()
            if name in WRITABLE_FIELDS:
                scalar = _scalar(value)
                if not isinstance(scalar, _Unset):
                    lead[name] = scalar
            elif name in MULTI_FIELDS:
                entries = self._merge_multi(name, lead.get(name, []), value, creating=creating)
                if entries:
                    lead[name] = entries
                else:
                    lead.pop(name, None)
            elif name.startswith(USER_FIELD_PREFIX):
                lead[name] = value
        if lead["STATUS_ID"] != previous_stage:
            lead["STATUS_SEMANTIC_ID"] = stage_semantic_id(lead["STATUS_ID"])
            lead["MOVED_BY_ID"] = self._user_id
            lead["MOVED_TIME"] = now
            lead["DATE_CLOSED"] = now if lead["STATUS_SEMANTIC_ID"] != "P" else None
        lead["HAS_PHONE"] = "Y" if lead.get("PHONE") else "N"
        lead["HAS_EMAIL"] = "Y" if lead.get("EMAIL") else "N"
        lead["MODIFY_BY_ID"] = self._user_id
        lead["DATE_MODIFY"] = now

    def _merge_multi(
        self, field: str, current: list[dict[str, str]], incoming: Any, *, creating: bool
    ) -> list[dict[str, str]]:
        """Multi-field update rules: no ID appends, an ID replaces, DELETE=Y or a blank VALUE
        removes that entry. On add every element is new (IDs are ignored)."""
        entries = [dict(entry) for entry in current]
        for raw in as_list(incoming):
            if not isinstance(raw, dict):
                continue
            item = {str(key).upper(): value for key, value in raw.items()}
            value = None if item.get("VALUE") is None else str(item["VALUE"]).strip()
            entry_id = None if creating else as_int(item.get("ID"))
            if entry_id is None:
                if value:
                    new_id = self._next_multi_id
                    self._next_multi_id += 1
                    entries.append(_multi_entry(new_id, field, value, item.get("VALUE_TYPE")))
                continue
            position = next(
                (index for index, entry in enumerate(entries) if entry["ID"] == str(entry_id)),
                None,
            )
            if position is None:
                continue
            existing = entries[position]
            if str(item.get("DELETE", "")).upper() == "Y" or value == "":
                del entries[position]
            else:
                entries[position] = _multi_entry(
                    entry_id,
                    field,
                    existing["VALUE"] if value is None else value,
                    item.get("VALUE_TYPE") or existing["VALUE_TYPE"],
                )
        return entries

    async def _persist(self, lead_id: int) -> None:
        if self._db is None:
            return
        await self._db.execute(
            "INSERT OR REPLACE INTO leads (id, body) VALUES (?, ?)",
            (lead_id, json.dumps(self._leads[lead_id], ensure_ascii=False)),
        )
        await self._db.executemany(
            "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
            [("lead", self._next_lead_id), ("multi", self._next_multi_id)],
        )
        await self._db.commit()


def _multi_entry(entry_id: int, field: str, value: str, value_type: Any) -> dict[str, str]:
    allowed = MULTI_VALUE_TYPES[field]
    kind = str(value_type or "").upper()
    if kind not in allowed:
        kind = "WORK" if "WORK" in allowed else "OTHER"
    return {"ID": str(entry_id), "VALUE_TYPE": kind, "VALUE": value, "TYPE_ID": field}
