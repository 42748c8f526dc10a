"""`b24sync users list|show`: Core's users read straight from the database (Core need not run).
The work is in `report.py`, imported when a command runs."""

from __future__ import annotations

from typing import Annotated

import typer

from b24sync.contracts import MAX_ID
from b24sync.core.models import SyncStatus
from b24sync.settings import get_settings

users_app = typer.Typer(
    help="Core's users and their sync state, read from the database.", no_args_is_help=True
)


@users_app.command("list")
def list_users(
    status: Annotated[
        SyncStatus | None, typer.Option("--status", help="Only users in this sync state.")
    ] = None,
    search: Annotated[
        str | None,
        typer.Option("--search", help="Part of the name (any case), or digits of the phone."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="Users shown.")] = 50,
) -> None:
    """Users in id order: sync state, lead id, last error."""
    from b24sync.core.users.report import list_users as run

    raise typer.Exit(run(get_settings(), status=status, search=search or None, limit=limit))


@users_app.command("show")
def show_user(
    user_id: Annotated[int, typer.Argument(min=1, max=MAX_ID, metavar="ID")],
) -> None:
    """One user: fields, sync state, last error, and the history of its changes."""
    from b24sync.core.users.report import show_user as run

    raise typer.Exit(run(get_settings(), user_id))
