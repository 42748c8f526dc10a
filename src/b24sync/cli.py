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
def run() -> None:
    """Run the whole system in the foreground (migrate, Core, Bitrix, and the emulator when no
    BITRIX_WEBHOOK_URL is set); Ctrl-C stops everything."""
    from b24sync.supervisor import run_all

    raise typer.Exit(run_all(get_settings()))
