"""The drift check's findings as tables for a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from b24sync.reconcile.drift import NONE, DriftReport


def print_report(console: Console, report: DriftReport) -> None:
    # Cells are Text: values from the portal are printed as they are, never read as markup.
    if report.differences:
        table = Table("user", "field", "Core", "Bitrix24", title="Differences")
        for difference in report.differences:
            table.add_row(
                Text(str(difference.user_id)),
                Text(difference.field),
                Text(difference.core),
                Text(difference.bitrix),
            )
        console.print(table)
    if report.leads_without_user:
        table = Table("lead", "ORIGIN_ID", "TITLE", title="Leads with no user")
        for lead in report.leads_without_user:
            table.add_row(Text(f"#{lead.id}"), Text(lead.origin_id or NONE), Text(lead.title))
        console.print(table)
    if report.duplicates:
        table = Table("user", "leads", title="Duplicate leads")
        for user_id, leads in report.duplicates.items():
            table.add_row(Text(str(user_id)), Text(", ".join(f"#{lead.id}" for lead in leads)))
        console.print(table)
    console.print(
        Text(
            f"Users compared: {report.compared}, with {report.leads} leads. "
            f"Drifted: {len(report.drifted)} (without a lead: {len(report.users_without_lead)}). "
            f"Leads with no user: {len(report.leads_without_user)}. "
            f"Users with duplicate leads: {len(report.duplicates)}. "
            f"Left out, a change on its way: {report.in_flight}."
        )
    )
