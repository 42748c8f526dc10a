"""The `b24sync` command: one entry point for every service and operator task."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from b24sync.settings import get_settings


class RateLimitPlan(StrEnum):
    STANDARD = "standard"
    ENTERPRISE = "enterprise"
    OFF = "off"


app = typer.Typer(
    name="b24sync",
    help="Keep a user base in sync with Bitrix24 CRM leads.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def core() -> None:
    """Run Core: the users HTTP API, the outbox relay and the reply consumer."""
    from b24sync.core.main import run

    run(get_settings())


@app.command()
def bitrix() -> None:
    """Run the Bitrix service: RabbitMQ events -> BullMQ jobs -> Bitrix24 REST calls."""
    from b24sync.bitrix.main import run

    run(get_settings())


@app.command()
def portal(
    port: Annotated[int | None, typer.Option(help="Port (PORTAL_PORT).")] = None,
    rate_limit: Annotated[
        RateLimitPlan | None, typer.Option(help="Request limit plan (PORTAL_RATE_LIMIT).")
    ] = None,
    latency_ms: Annotated[
        int | None, typer.Option(min=0, help="Latency added to every call.")
    ] = None,
    error_rate: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Share of calls answered with a 5xx.")
    ] = None,
    timeout_rate: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Share of writes done, then answered too late."),
    ] = None,
    outage_s: Annotated[
        float | None, typer.Option(min=0.0, help="A full outage for this long after start.")
    ] = None,
    state_file: Annotated[
        str | None, typer.Option(help="SQLite file that keeps the leads across restarts.")
    ] = None,
) -> None:
    """Run the built-in Bitrix24 portal emulator. Options override the PORTAL_* settings;
    faults can also be changed at run time through /admin/faults."""
    from b24sync.portal.main import run

    overrides = {
        "portal_port": port,
        "portal_rate_limit": rate_limit.value if rate_limit else None,
        "portal_latency_ms": latency_ms,
        "portal_error_rate": error_rate,
        "portal_timeout_rate": timeout_rate,
        "portal_outage_s": outage_s,
        "portal_state_file": state_file,
    }
    settings = get_settings().model_copy(
        update={key: value for key, value in overrides.items() if value is not None}
    )
    run(settings)


@app.command()
def migrate() -> None:
    """Create the database if missing and apply the Alembic migrations."""
    from b24sync.core.migrate import migrate as run_migrations

    run_migrations(get_settings())


@app.command()
def reconcile(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the differences; send nothing.")
    ] = False,
) -> None:
    """Compare the portal's leads with Core's users (name, phone, stage) and send the drifted
    users again; this overwrites edits made in Bitrix24 to those fields. Exit status: 0 in
    sync, 1 differences found, 2 the check could not run."""
    from b24sync.reconcile.main import run as run_reconcile

    raise typer.Exit(run_reconcile(get_settings(), dry_run=dry_run))


# Unknown options reach the command as ids: `-5` or `--faild` gets the same one-line answer
# as any other bad id.
@app.command(context_settings={"ignore_unknown_options": True})
def resync(
    user_ids: Annotated[
        list[str] | None, typer.Argument(help="Ids of the users to send again.", metavar="ID")
    ] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed user.")] = False,
    everyone: Annotated[bool, typer.Option("--all", help="Every user.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Send every field, applied even over a version the Bitrix service holds as "
            "newer (overwrites edits made in Bitrix24).",
        ),
    ] = False,
) -> None:
    """Send users again as they are now: a new event each (a create while the lead id is
    unknown, an update otherwise) with the fields changed since Bitrix24 last confirmed them.
    For failures that wait for a change. Talks to the database directly; Core publishes."""
    from b24sync.core.sync.resync_command import run as run_resync

    raise typer.Exit(
        run_resync(get_settings(), user_ids or [], failed=failed, everyone=everyone, force=force)
    )


@app.command()
def run() -> None:
    """Run the whole system in the foreground (migrate, Core, Bitrix, and the emulator when no
    BITRIX_WEBHOOK_URL is set); Ctrl-C stops everything."""
    from b24sync.supervisor import run_all

    raise typer.Exit(run_all(get_settings()))
