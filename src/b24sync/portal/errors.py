"""Portal errors: ``{"error": CODE, "error_description": TEXT}`` with an HTTP status."""

from __future__ import annotations


class PortalError(Exception):
    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(f"{code or status}: {description}")
        self.status = status
        self.code = code
        self.description = description

    def body(self) -> dict[str, str]:
        return {"error": self.code, "error_description": self.description}

    @property
    def outcome(self) -> str:
        """The name this failure is counted under in the stats: the code, else the text."""
        return self.code or self.description


# `crm.lead.*` business failures come with an empty code and HTTP 400.
def crm_error(description: str) -> PortalError:
    return PortalError(400, "", description)


def not_found() -> PortalError:
    return crm_error("Not found")


def invalid_id() -> PortalError:
    return crm_error("ID is not defined or invalid.")


def method_not_found() -> PortalError:
    return PortalError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")


def query_limit_exceeded() -> PortalError:
    return PortalError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")


def operation_time_limit() -> PortalError:
    return PortalError(
        429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit."
    )
