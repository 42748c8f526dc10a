"""Typed errors: each carries the HTTP status it answers with, rendered as JSON by the app."""

from __future__ import annotations

from typing import Any


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
            {
                "type": "value_error",
                "loc": ["body", self.field],
                "msg": self.field_message,
                "input": self.value,
            }
        ]
