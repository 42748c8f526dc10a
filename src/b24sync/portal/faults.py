"""Injected failures: random ones (latency, 5xx, late answers, outages) and a deterministic
script ("the next N calls of method M answer X") for tests."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from b24sync.portal.params import method_name
from b24sync.settings import Settings

HTML_REASONS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}


def html_page(status: int) -> str:
    """The error page a portal's nginx front answers with when the backend is down."""
    title = f"{status} {HTML_REASONS.get(status, 'Error')}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


class FaultConfig(BaseModel):
    """Random faults, set at start from the settings and at run time by `PUT /admin/faults`."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: int = Field(0, ge=0, description="added before every REST call")
    error_rate: float = Field(0.0, ge=0, le=1, description="share of calls answered with a 5xx")
    error_statuses: list[int] = Field(default_factory=lambda: [500, 502, 504], min_length=1)
    error_format: Literal["json", "html", "mixed"] = "mixed"
    timeout_rate: float = Field(
        0.0, ge=0, le=1, description="share of writes answered only after timeout_delay_s"
    )
    timeout_delay_s: float = Field(35.0, ge=0)
    outage_s: float = Field(0.0, ge=0, description="full outage for this long from now")
    outage_mode: Literal["html", "connection"] = "html"

    @classmethod
    def from_settings(cls, settings: Settings) -> FaultConfig:
        return cls(
            latency_ms=settings.portal_latency_ms,
            error_rate=settings.portal_error_rate,
            timeout_rate=settings.portal_timeout_rate,
            timeout_delay_s=settings.portal_timeout_delay_s,
            outage_s=settings.portal_outage_s,
            outage_mode=settings.portal_outage_mode,
        )


class ScriptedFault(BaseModel):
    """`POST /admin/faults/script`: the next `times` calls of `method` answer as described."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="REST method name, case-insensitive; '*' matches any")
    times: int = Field(1, ge=1)
    kind: Literal["error", "html", "timeout_after_write"] = "error"
    status: int | None = Field(None, description="default: 500 for error, 502 for html")
    error: str = "INTERNAL_SERVER_ERROR"
    description: str = "Internal server error"
    delay_s: float | None = Field(
        None, ge=0, description="timeout_after_write; default from config"
    )

    @field_validator("method")
    @classmethod
    def _normalise_method(cls, value: str) -> str:
        return method_name(value)

    def matches(self, method: str) -> bool:
        return self.method in ("*", method)

    @property
    def http_status(self) -> int:
        if self.status is not None:
            return self.status
        return 502 if self.kind == "html" else 500


@dataclass(frozen=True)
class RandomError:
    status: int
    html: bool


class Faults:
    def __init__(self, config: FaultConfig) -> None:
        self._random = random.Random()
        self.script: list[ScriptedFault] = []
        self.config = config
        self.outage_until = 0.0
        self.configure(config)

    def configure(self, config: FaultConfig) -> None:
        self.config = config
        self.outage_until = time.time() + config.outage_s if config.outage_s else 0.0

    def outage(self) -> Literal["html", "connection"] | None:
        """The outage mode while an outage lasts, else None."""
        return self.config.outage_mode if time.time() < self.outage_until else None

    def outage_remaining_s(self) -> float:
        return max(0.0, self.outage_until - time.time())

    def add_script(self, fault: ScriptedFault) -> None:
        self.script.append(fault)

    def take_scripted(self, method: str) -> ScriptedFault | None:
        """The first scripted fault for this method, spending one of its `times`."""
        for fault in self.script:
            if fault.matches(method):
                fault.times -= 1
                if fault.times == 0:
                    self.script.remove(fault)
                return fault
        return None

    def random_error(self) -> RandomError | None:
        if not self._random.random() < self.config.error_rate:
            return None
        error_format = self.config.error_format
        html = error_format == "html" or (error_format == "mixed" and self._random.random() < 0.5)
        return RandomError(status=self._random.choice(self.config.error_statuses), html=html)

    def random_timeout(self) -> bool:
        return self._random.random() < self.config.timeout_rate
