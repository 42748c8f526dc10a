"""The drift check's rules: the portal's leads against every user in Core's database."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.core.users.repository import UserRepository
from b24sync.reconcile.drift import DriftCheck, DriftReport
from b24sync.reconcile.leads import PortalLead
from b24sync.settings import Settings

# Users read and compared at a time: memory stays flat whatever the size of the table.
USERS_PAGE = 1000


class ReconcileService:
    async def check(
        self, session: AsyncSession, leads: Iterable[PortalLead], settings: Settings
    ) -> DriftReport:
        """Compares each user's latest state with its lead (`leads`: all of this system's)."""
        drift = DriftCheck(leads, settings.stage_map)
        repository = UserRepository(session)
        after_id = 0
        while users := await repository.page(after_id, USERS_PAGE):
            drift.compare(users)
            after_id = users[-1].id
            session.expunge_all()
        return drift.finish()


reconcile_service = ReconcileService()
