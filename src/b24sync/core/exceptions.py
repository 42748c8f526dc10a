"""Typed errors: each carries the HTTP status it answers with, rendered as JSON by the app."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from b24sync.logs import get_logger

log = get_logger(__name__)


class CoreError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def detail(self) -> Any:
        return self.message


class NotFoundError(CoreError):
    status_code = 404


class UnauthorizedError(CoreError):
    status_code = 401


class FieldValidationError(CoreError):
    """A value the schema accepts but the rules reject; rendered like FastAPI's own 422s."""

    status_code = 422

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.field_message = message
        self.value = value

    def detail(self) -> Any:
        return [
            sendable_error(
                {
                    "type": "value_error",
                    "loc": ["body", self.field],
                    "msg": self.field_message,
                    "input": self.value,
                }
            )
        ]


def error_response(exc: CoreError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse({"detail": exc.detail()}, status_code=exc.status_code, headers=headers)


def database_unavailable_response(exc: Exception) -> JSONResponse:
    log.warning("[Core] Database unavailable", error=exc)
    return JSONResponse({"detail": "Database unavailable, try again"}, status_code=503)


def sendable_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of a 422's `detail` in FastAPI's shape, safe to answer with: its input (and
    context) only when JSON in UTF-8 can carry them (no NaN or Infinity, no lone surrogate),
    and text that could not be sent escaped (`\\ud800`)."""
    sendable: dict[str, Any] = {}
    for key, value in error.items():
        if key == "loc":
            sendable[key] = [_escaped(part) if isinstance(part, str) else part for part in value]
        elif key == "msg":
            sendable[key] = _escaped(str(value))
        elif _encodable(value):
            sendable[key] = value
    return sendable


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return False
    return True


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
