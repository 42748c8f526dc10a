"""Bitrix24 REST client over an incoming webhook.

`BitrixClient.call(method, params)` returns the method's `result` or raises `BitrixError`.
Errors are classified by Bitrix24's `error` code (HTTP statuses lie: real portals answer 401 for
codes documented as 403). `call` and `request` take a slot of the shared bucket and wait out
rate-limit answers; `send` is one plain HTTP request, for a sender that takes its slots and
handles limit answers itself (the sync engine's transport). Every other transient failure is
left to the caller's retries.

The webhook URL holds the secret code, so no message, log line or exception built here contains
the URL: they name the REST method instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Self

import httpx
from redis.exceptions import RedisError

from b24sync.bitrix import metrics
from b24sync.bitrix.ratelimit import MethodBlockedError, RateLimiter
from b24sync.bitrix.stats import LIMIT_ANSWERS, REQUESTS, RequestStats
from b24sync.errors import os_reason
from b24sync.logs import get_logger

log = get_logger(__name__)

QUERY_LIMIT_EXCEEDED = "QUERY_LIMIT_EXCEEDED"
OPERATION_TIME_LIMIT = "OPERATION_TIME_LIMIT"
RATE_LIMIT_CODES = frozenset({QUERY_LIMIT_EXCEEDED, OPERATION_TIME_LIMIT})
TRANSIENT_CODES = RATE_LIMIT_CODES | {"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"}
# Never retried even when they come with a 5xx status: a human has to act.
PERMANENT_CODES = frozenset(
    {
        "OVERLOAD_LIMIT",
        "PORTAL_DELETED",
        "NO_AUTH_FOUND",
        "INVALID_CREDENTIALS",
        "expired_token",
        "invalid_token",
        "insufficient_scope",
        "ACCESS_DENIED",
        "user_access_error",
        "ERROR_METHOD_NOT_FOUND",
        "INVALID_REQUEST",
        "ERROR_BATCH_LENGTH_EXCEEDED",
    }
)
# Codes of failures that happen before Bitrix24 answers at all.
NETWORK_ERROR = "NETWORK_ERROR"
TIMEOUT = "TIMEOUT"
INVALID_RESPONSE = "INVALID_RESPONSE"


class BitrixError(Exception):
    """A failed Bitrix24 call. `code` is Bitrix24's `error` ("" for CRM business errors such as
    `Not found`) or one of NETWORK_ERROR / TIMEOUT / INVALID_RESPONSE / HTTP_<status>."""

    def __init__(
        self,
        method: str,
        code: str,
        description: str,
        *,
        http_status: int | None,
        transient: bool,
        retry_after_s: float | None = None,
    ) -> None:
        self.method = method
        self.code = code
        self.description = description
        self.http_status = http_status
        self.transient = transient
        self.retry_after_s = retry_after_s
        super().__init__(str(self))

    def __str__(self) -> str:
        code = f"{self.code}: " if self.code else ""
        return f"{self.method}: {code}{self.description}"

    @classmethod
    def from_answer(
        cls,
        method: str,
        answer: Mapping[str, Any],
        *,
        http_status: int | None,
        retry_after_s: float | None = None,
    ) -> Self:
        """The error Bitrix24 described (`error`, `error_description`); a command's error
        inside a batch has no status of its own and is classified as a 400."""
        code = str(answer.get("error") or "")
        return cls(
            method,
            code,
            str(answer.get("error_description") or "no description"),
            http_status=http_status,
            transient=is_transient(code, http_status or 400),
            retry_after_s=retry_after_s,
        )

    @property
    def rate_limited(self) -> bool:
        return self.code in RATE_LIMIT_CODES

    @property
    def not_found(self) -> bool:
        """The CRM's "no such item" answer (empty code, `Not found`)."""
        return self.code == "" and "not found" in self.description.lower()


def is_transient(code: str, http_status: int) -> bool:
    if code in TRANSIENT_CODES:
        return True
    if code in PERMANENT_CODES:
        return False
    return http_status >= 500


class BitrixClient:
    def __init__(
        self,
        webhook_url: str,
        *,
        limiter: RateLimiter | None,
        timeout_s: float,
        limit_wait_s: float,
        operation_limit_wait_s: float,
        max_limit_waits: int,
        max_limit_wait_s: float = 60.0,
        stats: RequestStats | None = None,
    ) -> None:
        """`stats`: where requests and limit answers are counted for Core's pipeline view (a
        limiter given its key counts the requests itself)."""
        self._base_url = webhook_url.rstrip("/")
        self._limiter = limiter
        self._timeout_s = timeout_s
        self._limit_wait_s = limit_wait_s
        self._operation_limit_wait_s = operation_limit_wait_s
        self._max_limit_waits = max_limit_waits
        self._max_limit_wait_s = max_limit_wait_s
        self._stats = stats
        # Per method: when Bitrix24 said its operating-time counter resets (unix seconds).
        self._operating_reset_at: dict[str, float] = {}
        # Redirects are not followed: a moved portal would turn the POST into a GET.
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Calls a REST method and returns its `result`."""
        return (await self.request(method, params))["result"]

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Calls a REST method and returns the whole answer (`result`, `time`, ...).

        Rate-limit answers do not fail the call: it waits for the limit to clear and tries again,
        at most `max_limit_waits` times.
        """
        waits = 0
        while True:
            try:
                return await self._request_once(method, params or {})
            except BitrixError as err:
                # Blocked at home (http_status None): another worker already heard it.
                if not await self.wait_out_limit(err, waits, heard=err.http_status is not None):
                    raise
                waits += 1

    async def wait_out_limit(self, err: BitrixError, waits: int, *, heard: bool) -> bool:
        """After the `waits`-th answer of a call: when it is a rate limit, waits for it to clear
        and returns True, or returns False when the waits are used up (or it is no limit).
        A limit `heard` from the portal slows down every worker sharing the limiter too."""
        if not err.rate_limited:
            return False
        delay_s = await self.heed_limit(err, waits, heard=heard)
        if waits >= self._max_limit_waits:
            return False
        log.warning(
            f"[Bitrix] {err.method} hit the Bitrix24 limit ({err.code}), "
            f"waiting {delay_s:.1f}s ({waits + 1}/{self._max_limit_waits})"
        )
        await asyncio.sleep(delay_s)
        return True

    async def heed_limit(self, err: BitrixError, waits: int, *, heard: bool) -> float:
        """The seconds to wait after the `waits`-th limit answer `err` in a row. A limit
        `heard` from the portal is passed on to every worker sharing the limiter: a full
        bucket, or the method blocked for as long."""
        delay_s = min(self._limit_delay_s(err, waits), self._max_limit_wait_s)
        if heard:
            await self._count(LIMIT_ANSWERS)
        if self._limiter is not None and heard:
            if err.code == QUERY_LIMIT_EXCEEDED:
                await self._limiter.fill()
            else:
                await self._limiter.block(err.method, delay_s)
        return delay_s

    def _limit_delay_s(self, err: BitrixError, waits: int) -> float:
        if err.retry_after_s is not None:
            return err.retry_after_s
        if err.code == OPERATION_TIME_LIMIT:
            return self._operation_reset_in_s(err.method) or self._operation_limit_wait_s
        # Bucket overflow: one slot drains quickly; back off further if it keeps happening.
        return float(self._limit_wait_s * 1.5**waits)

    def bucket_free_share(self) -> float:
        """The share of the shared bucket free now, as far as this process can tell (1 when
        there is no bucket)."""
        return 1.0 if self._limiter is None else self._limiter.free_share()

    @property
    def slot_interval_s(self) -> float:
        """How long the shared bucket takes to free one slot (0 when there is no bucket)."""
        return 0.0 if self._limiter is None else self._limiter.interval_s

    async def take_request_slot(self, method: str) -> None:
        """Waits for a free slot of the shared bucket and takes it (no-op without a limiter).
        Raises the OPERATION_TIME_LIMIT error while another worker was told `method` is
        blocked."""
        if self._limiter is None:
            await self._count(REQUESTS)
            return
        try:
            await self._limiter.acquire(method=method)
        except MethodBlockedError as blocked:
            raise BitrixError(
                method,
                OPERATION_TIME_LIMIT,
                "Method is blocked due to operation time limit (as another worker was told)",
                http_status=None,
                transient=True,
                retry_after_s=blocked.retry_after_s,
            ) from None

    async def _count(self, kind: str) -> None:
        """Counts for the pipeline view; the figures are not worth failing a request for."""
        if self._stats is None:
            return
        try:
            await self._stats.count(kind)
        except (RedisError, OSError) as exc:
            log.debug(f"[Bitrix] Could not count a {kind} figure: {exc}")

    async def _request_once(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        await self.take_request_slot(method)
        return await self.send(method, params)

    async def send(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One HTTP request for a slot the caller already took (`take_request_slot`): the whole
        answer, or `BitrixError` (limit answers included; nothing is waited out here)."""
        started = time.monotonic()
        code = "OK"
        try:
            try:
                response = await self._http.post(f"{self._base_url}/{method}", json=params)
            except httpx.TimeoutException as exc:
                raise BitrixError(
                    method,
                    TIMEOUT,
                    f"no answer within {self._timeout_s:g}s ({type(exc).__name__}); "
                    "the call may still have taken effect",
                    http_status=None,
                    transient=True,
                ) from None
            except httpx.TransportError as exc:
                raise BitrixError(
                    method,
                    NETWORK_ERROR,
                    f"cannot reach Bitrix24 ({_network_reason(exc)})",
                    http_status=None,
                    transient=True,
                ) from None
            return self._parse(method, response)
        except BitrixError as err:
            code = err.code or "EMPTY"
            raise
        finally:
            metrics.API_CALLS.labels(method=method, code=code).inc()
            metrics.API_CALL_SECONDS.labels(method=method).observe(time.monotonic() - started)

    def _parse(self, method: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if 300 <= status < 400:
            raise BitrixError(
                method,
                f"HTTP_{status}",
                "the portal answered with a redirect; has its address changed?",
                http_status=status,
                transient=False,
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # HTML error pages of proxies and of the portal itself.
            content_type = response.headers.get("content-type", "unknown").split(";")[0]
            raise BitrixError(
                method,
                INVALID_RESPONSE,
                f"HTTP {status} answer is not a JSON object ({content_type})",
                http_status=status,
                transient=True,
            )
        if "error" in body:
            raise BitrixError.from_answer(
                method,
                body,
                http_status=status,
                retry_after_s=self._operation_reset_in_s(method)
                if body.get("error") == OPERATION_TIME_LIMIT
                else None,
            )
        if status != 200 or "result" not in body:
            raise BitrixError(
                method,
                f"HTTP_{status}",
                "answer without a result",
                http_status=status,
                transient=status >= 500,
            )
        self.note_timing(method, body.get("time"))
        return body

    def note_timing(self, method: str, timing: Any) -> None:
        """Remembers from an answer's `time` (a command's inside a batch too) when a 429 of
        `method` would clear. Every `time` field is optional."""
        if isinstance(timing, dict) and isinstance(timing.get("operating_reset_at"), int | float):
            self._operating_reset_at[method] = float(timing["operating_reset_at"])

    def _operation_reset_in_s(self, method: str) -> float | None:
        reset_at = self._operating_reset_at.get(method)
        if reset_at is None or reset_at <= time.time():
            return None
        return reset_at - time.time()


def _network_reason(exc: BaseException) -> str:
    """The OS-level reason of a transport error (`ConnectError: Connection refused`), built from
    errno alone: the messages of the underlying errors can carry hosts and URLs."""
    name = type(exc).__name__
    reason = os_reason(exc)
    return name if reason == name else f"{name}: {reason}"
