"""Every lead of this system on the portal, read in as few requests as Bitrix24 allows.

The first `crm.lead.list` page tells the total; the other pages are then asked for in `batch`
requests of up to 50 pages each (a batch counts as one request against the portal's limit).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from b24sync.bitrix.batch import MAX_BATCH_COMMANDS, BatchCommandError, send_batch
from b24sync.bitrix.client import BitrixClient, BitrixError

PAGE_SIZE = 50  # fixed by Bitrix24
LIST = "crm.lead.list"
_SELECT = ["ID", "ORIGIN_ID", "TITLE", "NAME", "LAST_NAME", "STATUS_ID", "PHONE"]
# A request that failed for a transient reason (network, 5xx, a limit that did not clear) is
# sent again, 2 s and then 4 s later: a long scan should not end on one bad answer.
_ATTEMPTS = 3
_RETRY_DELAY_S = 2.0


@dataclass(frozen=True, slots=True)
class PortalLead:
    id: int
    origin_id: str
    title: str
    name: str
    last_name: str
    status_id: str
    phones: tuple[str, ...]

    @classmethod
    def from_api(cls, raw: dict[str, Any]) -> PortalLead:
        entries = raw.get("PHONE")
        phones = entries if isinstance(entries, list) else []
        return cls(
            id=int(raw["ID"]),
            origin_id=str(raw.get("ORIGIN_ID") or ""),
            title=str(raw.get("TITLE") or ""),
            name=str(raw.get("NAME") or ""),
            last_name=str(raw.get("LAST_NAME") or ""),
            status_id=str(raw.get("STATUS_ID") or ""),
            phones=tuple(
                str(entry.get("VALUE") or "") for entry in phones if isinstance(entry, dict)
            ),
        )


class LeadScan:
    """Reads the leads whose ORIGINATOR_ID is `originator_id`, in ID order."""

    def __init__(self, client: BitrixClient, originator_id: str) -> None:
        self._client = client
        self._originator_id = originator_id

    async def all(self) -> list[PortalLead]:
        first = await self._first_page()
        pages = [first["result"]]
        starts = list(range(PAGE_SIZE, int(first.get("total") or 0), PAGE_SIZE))
        for at in range(0, len(starts), MAX_BATCH_COMMANDS):
            pages.extend(await self._pages(starts[at : at + MAX_BATCH_COMMANDS]))
        # Leads added or deleted during the scan shift the pages: a lead may come twice.
        leads = {
            lead.id: lead
            for page in pages
            if isinstance(page, list)
            for lead in map(PortalLead.from_api, page)
        }
        return list(leads.values())

    def _params(self, start: int) -> dict[str, Any]:
        return {
            "filter": {"=ORIGINATOR_ID": self._originator_id},
            "select": _SELECT,
            "order": {"ID": "ASC"},
            "start": start,
        }

    async def _first_page(self) -> dict[str, Any]:
        """The first page with the total (a list answer's `total`, beside its `result`)."""
        failures = 0
        while True:
            try:
                return await self._client.request(LIST, self._params(0))
            except BitrixError as err:
                failures += 1
                if not err.transient or failures >= _ATTEMPTS:
                    raise
            await _pause_after(failures)

    async def _pages(self, starts: list[int]) -> list[Any]:
        """The pages at `starts`, in one batch. Pages that hit a limit inside it wait for it
        and go again, as a lone call would; a failed request is sent again."""
        pages: dict[int, Any] = {}
        limit_waits = failures = 0
        while missing := [start for start in starts if start not in pages]:
            outcomes = await send_batch(self._client, [(LIST, self._params(s)) for s in missing])
            failed: BitrixError | None = None
            for start, outcome in zip(missing, outcomes, strict=True):
                if not isinstance(outcome, BitrixError):
                    pages[start] = outcome["result"]
                elif outcome.transient:
                    failed = outcome
                else:
                    raise outcome
            if failed is None:
                continue
            if isinstance(failed, BatchCommandError) and failed.rate_limited:
                if not await self._client.wait_out_limit(failed, limit_waits, heard=True):
                    raise failed
                limit_waits += 1
                continue
            failures += 1
            if failures >= _ATTEMPTS:
                raise failed
            await _pause_after(failures)
        return [pages[start] for start in starts]


async def _pause_after(failures: int) -> None:
    await asyncio.sleep(_RETRY_DELAY_S * 2 ** (failures - 1))
