"""The `b24sync` command: one entry point for every service and operator task."""

from __future__ import annotations

import typer

from b24sync.settings import get_settings

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
def portal() -> None:
    """Run the built-in Bitrix24 portal emulator."""
    from b24sync.portal.main import run

    run(get_settings())


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
