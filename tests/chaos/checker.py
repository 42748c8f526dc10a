"""Core's users, read from its database, against the emulator's leads: what went wrong, counted."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from b24sync.core.db import asyncpg_dsn
from b24sync.settings import Settings

# Every one of these must be 0.
COUNTS = {
    "lost": "users without a lead",
    "duplicate": "users with more than one lead",
    "stale": "users whose lead differs from their latest name, phone or stage",
    "wrongly_synced": (
        "users shown synced whose lead is stale or missing, or synced_version != version"
    ),
    "stuck": "users still pending or failed",
    "wrong_lead_id": "users whose bitrix_lead_id is not (one of) their lead(s)",
    "orphan": "leads of ours whose ORIGIN_ID is no user",
}
SAMPLES_PER_COUNT = 10
STUCK_STATES = ("pending", "failed")
# What a read raises while PostgreSQL restarts.
DATABASE_DOWN = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class CoreDatabase:
    """Core's tables, read directly (a connection per read, so a PostgreSQL restart costs only
    the reads made while it is down)."""

    def __init__(self, database_url: str) -> None:
        self.dsn = asyncpg_dsn(database_url)

    async def _fetch(self, query: str) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self.dsn, timeout=5)
        try:
            rows: list[asyncpg.Record] = await connection.fetch(query, timeout=10)
            return rows
        finally:
            await connection.close()

    async def users(self) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT id, full_name, phone, stage, version, synced_version, sync_status,"
            " bitrix_lead_id, sync_error, sync_error_code FROM users ORDER BY id"
        )

    async def versions(self) -> dict[int, tuple[int, int]]:
        """Each user's (version, synced_version or 0)."""
        rows = await self._fetch("SELECT id, version, synced_version FROM users")
        return {row["id"]: (row["version"], row["synced_version"] or 0) for row in rows}

    async def unpublished_events(self) -> int:
        rows = await self._fetch(
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL"
        )
        count: int = rows[0]["n"]
        return count


@dataclass
class Verdict:
    users: int
    leads: int
    counts: dict[str, int]
    samples: dict[str, list[dict[str, Any]]]
    sync_states: dict[str, int]
    unpublished_events: int

    @property
    def clean(self) -> bool:
        return not any(self.counts.values())

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class _Tally:
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, sample: dict[str, Any]) -> None:
        self.counts[name] += 1
        if len(self.samples[name]) < SAMPLES_PER_COUNT:
            self.samples[name].append(sample)


def expected_lead(user: asyncpg.Record, settings: Settings) -> dict[str, Any]:
    first, _, last = user["full_name"].partition(" ")
    return {
        "TITLE": user["full_name"],
        "NAME": first,
        "LAST_NAME": last.strip(),
        "PHONE": [user["phone"]],
        "STATUS_ID": settings.stage_map.get(user["stage"], user["stage"]),
    }


def lead_values(lead: dict[str, Any]) -> dict[str, Any]:
    phones = lead.get("PHONE") or []
    return {
        "TITLE": lead.get("TITLE"),
        "NAME": lead.get("NAME"),
        "LAST_NAME": lead.get("LAST_NAME") or "",
        "PHONE": [phone.get("VALUE") for phone in phones],
        "STATUS_ID": lead.get("STATUS_ID"),
    }


def differences(user: asyncpg.Record, lead: dict[str, Any], settings: Settings) -> dict[str, Any]:
    want, have = expected_lead(user, settings), lead_values(lead)
    return {key: {"core": want[key], "lead": have[key]} for key in want if want[key] != have[key]}


async def portal_leads(portal_url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=portal_url, timeout=30) as client:
        response = await client.get("/admin/leads")
        response.raise_for_status()
        leads: list[dict[str, Any]] = response.json()
        return leads


async def check(database: CoreDatabase, portal_url: str, settings: Settings) -> Verdict:
    users = await database.users()
    leads = await portal_leads(portal_url)
    ours: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for lead in leads:
        if lead.get("ORIGINATOR_ID") == settings.originator_id:
            ours[str(lead.get("ORIGIN_ID"))].append(lead)
    tally = _Tally()
    for user in users:
        user_leads = ours.get(str(user["id"]), [])
        lead_ids = [int(lead["ID"]) for lead in user_leads]
        # The one Core names, else the oldest.
        lead = next((one for one in user_leads if int(one["ID"]) == user["bitrix_lead_id"]), None)
        if lead is None and user_leads:
            lead = user_leads[0]
        drift = differences(user, lead, settings) if lead is not None else {}
        sample = {
            "user_id": user["id"],
            "version": user["version"],
            "synced_version": user["synced_version"],
            "sync_status": user["sync_status"],
            "sync_error": user["sync_error"],
            "sync_error_code": user["sync_error_code"],
            "bitrix_lead_id": user["bitrix_lead_id"],
            "lead_ids": lead_ids,
            "differences": drift,
        }
        if not user_leads:
            tally.add("lost", sample)
        if len(user_leads) > 1:
            tally.add("duplicate", sample)
        if drift:
            tally.add("stale", sample)
        if user["sync_status"] == "synced" and (
            lead is None or drift or user["synced_version"] != user["version"]
        ):
            tally.add("wrongly_synced", sample)
        if user["sync_status"] in STUCK_STATES:
            tally.add("stuck", sample)
        if user_leads and user["bitrix_lead_id"] not in lead_ids:
            tally.add("wrong_lead_id", sample)
    user_ids = {str(user["id"]) for user in users}
    for origin_id, orphans in ours.items():
        if origin_id not in user_ids:
            for lead in orphans:
                tally.add("orphan", {"lead_id": lead["ID"], "origin_id": origin_id})
    return Verdict(
        users=len(users),
        leads=len(leads),
        counts={name: tally.counts[name] for name in COUNTS},
        samples={name: tally.samples[name] for name in COUNTS if tally.samples[name]},
        sync_states=dict(Counter(user["sync_status"] for user in users)),
        unpublished_events=await database.unpublished_events(),
    )
