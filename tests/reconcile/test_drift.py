"""Users against leads, field by field: what counts as drift and who is sent again."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from b24sync.core.models import SyncStatus, User
from b24sync.reconcile.drift import LEAD, NONE, Difference, DriftCheck, DriftReport
from b24sync.reconcile.leads import PortalLead


def user(user_id: int, **fields: Any) -> User:
    values: dict[str, Any] = {
        "full_name": "Иван Иванов",
        "phone": "+77001112233",
        "stage": "NEW",
        "bitrix_lead_id": 100 + user_id,
        "sync_status": SyncStatus.SYNCED.value,
        **fields,
    }
    return User(id=user_id, **values)


def lead_of(user_id: int, **fields: Any) -> PortalLead:
    base = PortalLead(
        id=100 + user_id,
        origin_id=str(user_id),
        title="Иван Иванов",
        name="Иван",
        last_name="Иванов",
        status_id="NEW",
        phones=("+77001112233",),
    )
    return replace(base, **fields)


def check(
    users: list[User], leads: list[PortalLead], stage_map: dict[str, str] | None = None
) -> DriftReport:
    drift = DriftCheck(leads, stage_map or {})
    drift.compare(users)
    return drift.finish()


def test_a_lead_as_core_would_write_it_is_no_drift() -> None:
    report = check(
        [user(1), user(2, full_name="Мадонна")],
        [lead_of(1), lead_of(2, title="Мадонна", name="Мадонна", last_name="")],
    )
    assert report == DriftReport(compared=2, leads=2)
    assert not report.found


def test_each_field_edited_in_the_portal_is_a_difference() -> None:
    leads = [
        lead_of(1, title="Иван Грозный", last_name="Грозный"),
        lead_of(2, phones=("+77001112233", "+77009998877")),
        lead_of(3, phones=()),
        lead_of(4, status_id="JUNK"),
    ]
    report = check([user(n) for n in (1, 2, 3, 4)], leads)
    assert report.differences == [
        Difference(1, "TITLE", "Иван Иванов", "Иван Грозный"),
        Difference(1, "LAST_NAME", "Иванов", "Грозный"),
        Difference(2, "PHONE", "+77001112233", "+77001112233, +77009998877"),
        Difference(3, "PHONE", "+77001112233", NONE),
        Difference(4, "STATUS_ID", "NEW", "JUNK"),
    ]
    assert report.drifted == [1, 2, 3, 4]
    assert report.found


def test_stages_compare_through_the_stage_map() -> None:
    mapping = {"IN_PROCESS": "UC_WORKING"}
    in_sync = check([user(1, stage="IN_PROCESS")], [lead_of(1, status_id="UC_WORKING")], mapping)
    assert not in_sync.found
    drifted = check([user(1, stage="IN_PROCESS")], [lead_of(1, status_id="IN_PROCESS")], mapping)
    assert drifted.differences == [Difference(1, "STATUS_ID", "UC_WORKING", "IN_PROCESS")]


def test_missing_foreign_and_duplicate_leads() -> None:
    users = [user(1), user(2), user(3, bitrix_lead_id=None), user(4)]
    leads = [
        lead_of(1),
        lead_of(1, id=900),  # a second lead of user 1, the same as the first
        lead_of(4, id=400),  # user 4's lead is another one than Core knows
        lead_of(77),  # no such user
    ]
    report = check(users, leads)
    assert report.differences == [
        Difference(2, LEAD, "#102", NONE),
        Difference(3, LEAD, "not known", NONE),
        Difference(4, LEAD, "#104", "#400"),
    ]
    assert report.users_without_lead == [2, 3]
    assert report.drifted == [2, 3, 4]  # a duplicate alone is not sent again
    assert report.duplicates == {1: [lead_of(1), lead_of(1, id=900)]}
    assert report.leads_without_user == [lead_of(77)]


def test_the_lead_core_knows_is_the_one_compared() -> None:
    leads = [lead_of(1, id=50, status_id="JUNK"), lead_of(1)]
    report = check([user(1)], leads)
    assert report.differences == []
    assert list(report.duplicates) == [1]


def test_users_with_a_change_on_its_way_are_left_out() -> None:
    report = check(
        [user(1, sync_status=SyncStatus.PENDING.value, full_name="Иван Петров"), user(2)],
        [lead_of(1), lead_of(2)],
    )
    assert report.in_flight == 1
    assert report.compared == 1
    assert not report.found  # nor is user 1's lead one without a user
