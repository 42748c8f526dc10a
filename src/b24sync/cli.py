"""The `b24sync` command: one entry point for every service and operator task."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from b24sync.cli_support import CommandLine, settings_help
from b24sync.core.users.command import users_app
from b24sync.settings import get_settings


class RateLimitPlan(StrEnum):
    STANDARD = "standard"
    ENTERPRISE = "enterprise"
    OFF = "off"


app = CommandLine(
    name="b24sync",
    help="Keep a user base in sync with Bitrix24 CRM leads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Each command's --help lists the settings it reads (`settings_help`: groups of Settings, then
# single settings). These are read by every command that writes users straight to the database.
_DATABASE_COMMAND = (
    "database_url",
    "default_phone_region",
    "stages",
    "rabbitmq_reply_queue",
    "hold_until_lead_id",
    "log_level",
    "log_json",
)


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the whole traceback of an error.")
    ] = False,
) -> None:
    """An error you can fix (a setting, a service that is down, a port in use) ends a command
    with one line on stderr saying what to check, and exit status 1."""
    app.debug = debug


@app.command(epilog=settings_help("core", "messaging", "logging"))
def core() -> None:
    """Run Core: the users HTTP API, the outbox relay and the reply consumer."""
    from b24sync.core.main import run

    run(get_settings())


@app.command(
    epilog=settings_help(
        "messaging", "bitrix", "logging", names=("host", "portal_port", "portal_webhook")
    )
)
def bitrix() -> None:
    """Run the Bitrix service: RabbitMQ events -> BullMQ jobs -> Bitrix24 REST calls."""
    from b24sync.bitrix.main import run

    run(get_settings())


@app.command(epilog=settings_help("portal", "logging"))
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


@app.command(epilog=settings_help(names=("database_url", "log_level", "log_json")))
def migrate() -> None:
    """Create the database if missing and apply the Alembic migrations."""
    from b24sync.core.migrate import migrate as run_migrations

    run_migrations(get_settings())


@app.command(
    epilog=settings_help(
        "bitrix", names=(*_DATABASE_COMMAND, "portal_port", "portal_webhook", "log_pii")
    )
)
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
@app.command(
    context_settings={"ignore_unknown_options": True}, epilog=settings_help(names=_DATABASE_COMMAND)
)
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
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once sent, without following the sync.")
    ] = False,
    after: Annotated[
        int, typer.Option("--after", metavar="ID", min=0, help="With --all: users after this id.")
    ] = 0,
) -> None:
    """Send users again as they are now: a new event each (a create while the lead id is
    unknown, an update otherwise) with the fields changed since Bitrix24 last confirmed them,
    then show a progress bar until Bitrix24 has answered for each (synced or failed). For
    failures that wait for a change. Talks to the database directly; Core publishes.

    Resuming after Ctrl-C: users are sent a page per transaction, and sending one again is
    always safe. Run `--failed` again and it goes on with the users still failed; `--all`
    prints the id it stopped after: `--all --after ID` goes on from there."""
    from b24sync.core.sync.resync_command import run as run_resync

    code = run_resync(
        get_settings(),
        user_ids or [],
        failed=failed,
        everyone=everyone,
        force=force,
        wait=not no_wait,
        after=after,
    )
    raise typer.Exit(code)


@app.command("import", epilog=settings_help(names=_DATABASE_COMMAND))
def import_users(
    path: Annotated[
        Path, typer.Argument(metavar="FILE.csv", help="UTF-8 CSV: full_name,phone[,stage].")
    ],
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once loaded, without following the sync.")
    ] = False,
) -> None:
    """Load an existing user base: a CSV file with a header row and the columns full_name,
    phone and optionally stage (empty: NEW), UTF-8 with or without a BOM. Every row is checked
    first by the rules of POST /users; if any is bad, the bad rows are listed (line, column,
    message) and nothing is loaded. Then the users are created a page per transaction, with
    their events (Core publishes them), and a progress bar follows them until Bitrix24 has
    them all (synced or failed).

    Running it again (after Ctrl-C, or on a file that grew) creates nobody twice: a row whose
    name and phone already belong to a user is skipped, and so is a row repeating another.
    Exit status: 0 loaded, 1 bad rows, 2 the file cannot be read."""
    from b24sync.core.users.import_command import run as run_import

    raise typer.Exit(run_import(get_settings(), path, wait=not no_wait))


@app.command(
    epilog=settings_help(
        names=("database_url", "rabbitmq_url", "redis_url", "port", "bitrix_http_port",
               "portal_port", "bitrix_webhook_url", "bullmq_queue", "bullmq_prefix", "bitrix_plan"),
    )
)  # fmt: skip
def status() -> None:
    """Whether PostgreSQL, RabbitMQ, Redis, Core, the Bitrix service and the portal answer;
    users by sync state, the outbox backlog, the job queue, Bitrix24 requests, recent
    failures. Exit status 1 when anything is down."""
    from b24sync.core.pipeline.status_command import run as run_status

    raise typer.Exit(run_status(get_settings()))


app.add_typer(users_app, name="users")


@app.command(epilog=settings_help("core", "messaging", "bitrix", "portal", "logging"))
def run() -> None:
    """Run the whole system in the foreground (migrate, Core, Bitrix, and the emulator when no
    BITRIX_WEBHOOK_URL is set); Ctrl-C stops everything."""
    from b24sync.supervisor import run_all

    raise typer.Exit(run_all(get_settings()))
