"""Core's users against the portal's leads: what differs, field by field.

A user is compared with the lead a write would leave: TITLE, NAME and LAST_NAME from the full
name, PHONE holding exactly the user's phone, STATUS_ID the stage through STAGE_MAP. Users with
a change on its way (`pending`) are left out: their lead is still to be written.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from b24sync.bitrix.leads import split_name
from b24sync.core.models import SyncStatus, User
from b24sync.reconcile.leads import PortalLead

NONE = "—"
# The `field` of a difference that is about the lead itself rather than one of its fields.
LEAD = "lead"


@dataclass(frozen=True, slots=True)
class Difference:
    user_id: int
    field: str  # the lead's field (TITLE, NAME, LAST_NAME, PHONE, STATUS_ID) or LEAD
    core: str  # what the lead should hold, by Core
    bitrix: str  # what it holds


@dataclass
class DriftReport:
    compared: int = 0  # users compared with their lead
    in_flight: int = 0  # pending users, left out
    leads: int = 0  # leads of this system on the portal
    differences: list[Difference] = field(default_factory=list)
    # Users to send again: a field differs, or their lead is missing or not the one Core knows.
    drifted: list[int] = field(default_factory=list)
    users_without_lead: list[int] = field(default_factory=list)
    leads_without_user: list[PortalLead] = field(default_factory=list)
    # User id -> its leads (two or more), lowest id first.
    duplicates: dict[int, list[PortalLead]] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return bool(self.drifted or self.leads_without_user or self.duplicates)


class DriftCheck:
    """Compares users page by page with the leads, read in full beforehand."""

    def __init__(self, leads: Iterable[PortalLead], stage_map: Mapping[str, str]) -> None:
        self._stage_map = stage_map
        self._by_origin: dict[str, list[PortalLead]] = defaultdict(list)
        for lead in sorted(leads, key=lambda lead: lead.id):
            self._by_origin[lead.origin_id].append(lead)
        self.report = DriftReport(leads=sum(map(len, self._by_origin.values())))

    def compare(self, users: Iterable[User]) -> None:
        report = self.report
        for user in users:
            leads = self._by_origin.pop(str(user.id), [])
            if user.sync_status == SyncStatus.PENDING:
                report.in_flight += 1
                continue
            report.compared += 1
            if len(leads) > 1:
                report.duplicates[user.id] = leads
            differences = self._differences(user, leads)
            if differences:
                report.differences.extend(differences)
                report.drifted.append(user.id)
            if not leads:
                report.users_without_lead.append(user.id)

    def finish(self) -> DriftReport:
        """The report, with the leads no user claimed."""
        for leads in self._by_origin.values():
            self.report.leads_without_user.extend(leads)
        self._by_origin.clear()
        return self.report

    def _differences(self, user: User, leads: list[PortalLead]) -> list[Difference]:
        known = f"#{user.bitrix_lead_id}" if user.bitrix_lead_id is not None else "not known"
        if not leads:
            return [Difference(user.id, LEAD, known, NONE)]
        # The lead Core knows, or else the first one a look-up finds.
        lead = next((lead for lead in leads if lead.id == user.bitrix_lead_id), leads[0])
        first_name, last_name = split_name(user.full_name)
        status_id = self._stage_map.get(user.stage, user.stage)
        fields = [
            ("TITLE", user.full_name, lead.title),
            ("NAME", first_name, lead.name),
            ("LAST_NAME", last_name, lead.last_name),
            ("STATUS_ID", status_id, lead.status_id),
        ]
        differences = [
            Difference(user.id, name, expected or NONE, actual or NONE)
            for name, expected, actual in fields
            if expected != actual
        ]
        if lead.phones != (user.phone,):
            differences.append(
                Difference(user.id, "PHONE", user.phone, ", ".join(lead.phones) or NONE)
            )
        if user.bitrix_lead_id is not None and user.bitrix_lead_id != lead.id:
            differences.append(Difference(user.id, LEAD, known, f"#{lead.id}"))
        return differences
