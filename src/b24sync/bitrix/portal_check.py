"""Whether the portal takes the webhook: one cheap call at start, then again in the background
while the portal cannot be reached.

A webhook the portal rejects (a wrong code, a missing scope, plain HTTP on a real portal) stops
the service: only the operator can fix BITRIX_WEBHOOK_URL. A portal that cannot be reached
keeps the service running (events wait in BullMQ) but not ready, until a later call succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib

from b24sync.bitrix.client import BitrixClient, BitrixError
from b24sync.core.backoff import Backoff
from b24sync.errors import StartupError
from b24sync.logs import get_logger

log = get_logger(__name__)

# Served by every portal and by the emulator, reads nothing, changes nothing.
PROBE_METHOD = "crm.lead.fields"
PROBE_TIMEOUT_S = 10.0


class WebhookRejectedError(StartupError):
    pass


class PortalCheck:
    def __init__(
        self,
        client: BitrixClient,
        *,
        setting: str = "BITRIX_WEBHOOK_URL",
        timeout_s: float = PROBE_TIMEOUT_S,
        max_wait_s: float = 60,
    ) -> None:
        self._client = client
        self._setting = setting  # the one to check when the portal cannot be used
        self._timeout_s = timeout_s
        self._backoff = Backoff(initial_s=1.0, max_s=max_wait_s)
        self._task: asyncio.Task[None] | None = None
        # Why the portal cannot be used now; None once a call succeeded.
        self.problem: str | None = "not checked yet"
        self._delay = 0.0

    async def start(self) -> None:
        """Calls the portal once: raises `WebhookRejectedError` when it rejects the webhook;
        when it cannot be reached, goes on calling in the background until it answers."""
        if not await self._probe():
            self._task = asyncio.create_task(self._until_reachable(), name="portal-check")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _probe(self) -> bool:
        try:
            await asyncio.wait_for(self._client.call(PROBE_METHOD), self._timeout_s)
        except TimeoutError:
            self._failed(f"Bitrix24 did not answer {PROBE_METHOD} within {self._timeout_s:g}s")
            return False
        except BitrixError as err:
            if not err.transient:
                self.problem = f"Bitrix24 rejected the webhook ({err}): check {self._setting}"
                raise WebhookRejectedError(self.problem) from None
            self._failed(f"Bitrix24 cannot be reached ({err})")
            return False
        if self._backoff.reset():
            log.info("[Bitrix] Bitrix24 answers again; ready")
        self.problem = None
        return True

    def _failed(self, problem: str) -> None:
        self.problem = f"{problem}: check {self._setting}"
        delay = self._backoff.failed()
        if self._backoff.should_log:
            log.warning(f"[Bitrix] Not ready: {self.problem}; calling again in {delay:g}s")
        self._delay = delay

    async def _until_reachable(self) -> None:
        while True:
            await asyncio.sleep(self._delay)
            try:
                if await self._probe():
                    return
            except WebhookRejectedError as exc:
                # Too late to refuse to start: stays not ready, saying why.
                log.error(f"[Bitrix] {exc}")
                return
