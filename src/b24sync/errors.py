"""Errors an operator fixes outside the code: a setting, a service to start, a port to free."""

from __future__ import annotations

import errno
import os
import re
import socket
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

# asyncio folds per-address connect failures into "Multiple exceptions: [Errno 111] ...".
_ERRNO = re.compile(r"\[Errno (\d+)\]")


class StartupError(Exception):
    """A service or command cannot start. `str(exc)` is the one line to print: what is wrong
    and which setting to check. The command line prints it alone, with the traceback only
    under `--debug`."""


def os_reason(exc: BaseException) -> str:
    """The operating system's reason behind a connection error ("Connection refused", "Name or
    service not known"), found along its causes, built from errno alone: the messages of the
    underlying errors can carry hosts, URLs and passwords. The exception's type otherwise."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.strerror:
            return seen.strerror
        if isinstance(seen, OSError):
            number = seen.errno
            if number is None and (found := _ERRNO.search(str(seen))):
                number = int(found.group(1))
            if number is not None:
                return os.strerror(number)
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def unreachable(what: str, where: str, exc: BaseException, setting: str) -> StartupError:
    """`cannot reach PostgreSQL at postgresql://localhost:5433/core_db (Connection refused):
    check DATABASE_URL`. `where` must already be free of secrets (`describe_url`)."""
    return StartupError(f"cannot reach {what} at {where} ({os_reason(exc)}): check {setting}")


def port_in_use(host: str, port: int, setting: str, exc: OSError) -> StartupError:
    """The error for a listening socket that cannot be bound."""
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"port {port} is already in use on {host} by another process: "
            f"stop it or set {setting} to a free port"
        )
    return StartupError(f"cannot listen on {host}:{port} ({os_reason(exc)}): check {setting}")


# What pydantic's error types mean for a value read from the environment.
_PLAIN_MESSAGES = {
    "int_parsing": "not an integer",
    "int_from_float": "not an integer",
    "float_parsing": "not a number",
    "bool_parsing": "not true or false",
    "missing": "missing",
}


def describe_settings_error(settings_class: type[BaseSettings], exc: Exception) -> str:
    """One line naming each environment variable that holds an invalid value, e.g.
    `PORT: not an integer: 'abc'`. Values of secret settings are never shown."""
    if isinstance(exc, SettingsError):
        # pydantic-settings names the field only in its message; the JSON error is the cause.
        found = re.search(r'field "(\w+)"', str(exc))
        name = found.group(1).upper() if found else "a setting"
        reason = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        return f"{name}: not valid JSON{reason}"
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = _PLAIN_MESSAGES.get(error["type"]) or _plain(error["msg"])
        shown = "" if _is_secret(settings_class, field) else _shown_input(error)
        parts.append(f"{field.upper() or 'settings'}: {message}{shown}")
    return "; ".join(parts)


def _plain(message: str) -> str:
    # pydantic prefixes a validator's own message with "Value error, ".
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _shown_input(error: Any) -> str:
    value = error.get("input")
    if error["type"] == "missing" or not isinstance(value, str | int | float):
        return ""
    return f": {value!r}"


def _is_secret(settings_class: type[BaseSettings], field: str) -> bool:
    info = settings_class.model_fields.get(field)
    return info is not None and "SecretStr" in repr(info.annotation)


__all__ = [
    "StartupError",
    "describe_settings_error",
    "os_reason",
    "port_in_use",
    "unreachable",
]
