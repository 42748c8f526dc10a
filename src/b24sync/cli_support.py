"""What every `b24sync` command shares: errors as one line, and the settings in `--help`."""

from __future__ import annotations

import socket
import sys
from typing import Any

import typer
from pydantic import SecretStr, ValidationError
from pydantic_core import PydanticUndefined
from pydantic_settings import SettingsError
from rich.markup import escape
from sqlalchemy.exc import DBAPIError

from b24sync.errors import StartupError, describe_settings_error, os_reason
from b24sync.logs import mask_secrets
from b24sync.settings import Settings, settings_by_group

# Connections to a service that failed where the command did not say which (a broken pipe to
# `head` is no such thing).
_CONNECTION_ERRORS = (
    ConnectionRefusedError,
    ConnectionResetError,
    ConnectionAbortedError,
    socket.gaierror,
    TimeoutError,
    DBAPIError,
)


class CommandLine(typer.Typer):
    """The app: an error the operator can fix (a setting, a service to start, a port) ends the
    command with one line on stderr, `b24sync <command>: <what is wrong and what to check>`,
    and exit status 1; `--debug` shows the traceback instead. Other errors are bugs and keep
    their traceback."""

    debug = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (StartupError, ValidationError, SettingsError, *_CONNECTION_ERRORS) as exc:
            line = one_line(exc)
            if line is None or self.debug:
                raise
            command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
            prefix = f"b24sync {command}" if command else "b24sync"
            print(mask_secrets(f"{prefix}: {line}"), file=sys.stderr)
            sys.exit(1)


def one_line(exc: BaseException) -> str | None:
    """The line for an error the operator can fix; None for one that is a bug."""
    if isinstance(exc, StartupError):
        return str(exc)
    if isinstance(exc, SettingsError) or (
        isinstance(exc, ValidationError) and exc.title == Settings.__name__
    ):
        return describe_settings_error(Settings, exc)
    if isinstance(exc, _CONNECTION_ERRORS):
        # Reached only where a command does not say which service it was talking to.
        return (
            f"a connection failed ({os_reason(exc)}): check DATABASE_URL, RABBITMQ_URL, "
            "REDIS_URL and that those services run (--debug shows where)"
        )
    return None


def settings_help(*groups: str, names: tuple[str, ...] = ()) -> str:
    """A command's `--help` epilog: the settings it reads (every one of `groups` of Settings,
    then `names`), each as `NAME=default`; secrets show `(secret)`, never a value."""
    by_group = settings_by_group()
    fields = [name for group in groups for name in by_group[group]]
    fields += [name for name in names if name not in fields]
    lines = [f"  {name.upper()}={_default(name)}" for name in fields]
    # "\b" keeps the lines as they are instead of one wrapped paragraph.
    return "\b\nSettings it reads (environment or .env; defaults shown):\n" + escape(
        "\n".join(lines)
    )


def _default(name: str) -> str:
    info = Settings.model_fields[name]
    if info.annotation is not None and "SecretStr" in repr(info.annotation):
        return "(secret)" if info.default is not None else "(secret; unset)"
    value = info.default
    if value is PydanticUndefined and info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    if value is None:
        return "(unset)"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
