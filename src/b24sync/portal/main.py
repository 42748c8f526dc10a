"""Run the Bitrix24 portal emulator, standalone (`b24sync portal`) or inside a test.

REST: ``/rest/<user_id>/<code>/<method>[.json]``, GET or POST, JSON or form-encoded (PHP-style
nested keys), accepted webhook ``settings.portal_webhook``; so the client's webhook URL is
``settings.portal_webhook_url``. Methods: crm.lead.add/update/get/list/delete/fields,
crm.item.batchImport (leads only, ``entityTypeId`` 1, up to 20 items in ``data``, camelCase
fields with phones in ``fm``; answers ``{"items": [{"item": {"id": N}} | {"error", ...}]}``),
crm.status.list, crm.duplicate.findbycomm, batch.

Admin API (no webhook; on the same port)::

    GET    /healthz                 {"status": "ok", "pid", "ppid"}
    GET    /admin/leads             every lead, ordered by ID, exactly as crm.lead.get returns it
                                    (string values: "ID": "12"; PHONE/EMAIL included when set)
    GET    /admin/leads/{id}        one lead, or 404
    GET    /admin/stats             {"total": <HTTP REST requests>,
                                     "by_method": {"crm.lead.add": {"ok": 3,
                                                                    "QUERY_LIMIT_EXCEEDED": 1}},
                                     "bucket": {"level", "capacity", "drain_per_s"} | null}
                                    outcomes: "ok", the error code, the text of a code-less CRM
                                    error ("Not found"), "HTML_<status>", "OUTAGE",
                                    "timeout_after_write". Commands inside a batch are counted
                                    under their own method too (`total` counts HTTP requests).
    GET    /admin/calls             the latest 500 calls in order: [{"method", "outcome", "params"}]
    POST   /admin/reset             back to the start: no leads, no stats, faults from the
                                    settings, empty script, drained bucket and operating time
    GET    /admin/faults            random fault config + "outage_remaining_s" + "script"
    PUT    /admin/faults            replace the random fault config (omitted fields = no fault):
                                    {"latency_ms": 0, "error_rate": 0.0,
                                     "error_statuses": [500, 502, 504],
                                     "error_format": "json" | "html" | "mixed",
                                     "timeout_rate": 0.0,        # share of writes answered late
                                     "timeout_delay_s": 35.0,
                                     "outage_s": 0.0,            # full outage starting now
                                     "outage_mode": "html" | "connection"}
    POST   /admin/faults/script     the next `times` calls of `method` answer as described:
                                    {"method": "crm.lead.add", "times": 2,
                                     "kind": "error" | "html" | "timeout_after_write",
                                     "status": 503,              # default 500 (error), 502 (html)
                                     "error": "QUERY_LIMIT_EXCEEDED",
                                     "description": "Too many requests",
                                     "delay_s": 5}               # timeout_after_write only
                                    "error" answers {"error", "error_description"} with `status`;
                                    "html" answers an nginx error page with `status`;
                                    "timeout_after_write" runs the method (the write happens),
                                    then holds the answer for `delay_s`. `method` "*" matches
                                    any method. Entries apply to whole HTTP calls (a batch is
                                    method "batch"), first matching entry first.
    GET    /admin/faults/script     the pending script entries
    DELETE /admin/faults/script     drop them

A connection-level outage resets the connection of every REST call (the admin API still
answers), so a client sees a network error rather than an HTTP answer; such calls are not
counted in the stats. The order of the gates for one REST call: outage, webhook check
(401), latency, script, random 5xx, request limit (503), method (404 unknown), operating
limit (429), then a held answer for timeout_after_write.

Settings (``PORTAL_*``): ``portal_rate_limit`` standard (50 burst, 2/s) | enterprise (250, 5/s)
| off, overridden by ``portal_rate_burst`` / ``portal_rate_per_s``; ``portal_operating_limit_s``
(480 s per method over ``portal_operating_window_s``, None = off) with
``portal_operating_cost_s`` of simulated execution time per call; the faults at start
(``portal_latency_ms``, ``portal_error_rate``, ``portal_timeout_rate``,
``portal_timeout_delay_s``, ``portal_outage_s``, ``portal_outage_mode``); and
``portal_state_file``, a SQLite file that keeps the leads across restarts (memory only when
unset).

In tests, over real HTTP in the test's own event loop::

    from b24sync.portal.main import PortalServer, serve_portal

    async with serve_portal(settings) as base_url:     # "http://127.0.0.1:<portal_port>"
        webhook_url = settings.portal_webhook_url
        ...

    async with PortalServer(settings) as server:       # server.base_url, server.portal (state)
        ...

``create_app(settings)`` gives the bare FastAPI app (its lifespan opens the state file).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import TracebackType

import uvloop

from b24sync.logs import configure_logging, get_logger
from b24sync.portal.app import create_app
from b24sync.portal.state import Portal
from b24sync.serving import EmbeddedServer, HttpProtocol, wait_for_stop_signal
from b24sync.settings import Settings

__all__ = ["Portal", "PortalServer", "create_app", "run", "serve_portal"]

log = get_logger("b24sync.portal")

_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ")
_ALWAYS_SERVED = (b"/admin", b"/healthz")
# Seconds a shutdown waits for requests still in flight (injected delays are cut short).
_GRACEFUL_SHUTDOWN_S = 5


def _protocol_for(portal: Portal) -> type[HttpProtocol]:
    """The services' HTTP protocol, dropping REST requests during a connection-level outage."""

    class OutageAwareProtocol(HttpProtocol):
        def data_received(self, data: bytes) -> None:
            if portal.faults.outage() == "connection" and _is_rest_request(data):
                self.transport.abort()
                return
            super().data_received(data)

    return OutageAwareProtocol


def _is_rest_request(data: bytes) -> bool:
    """True for the start of a request that is not for the admin API."""
    if not data.startswith(_HTTP_METHODS):
        return False
    target = data.split(b" ", 2)[1]
    return not target.startswith(_ALWAYS_SERVED)


class PortalServer:
    """The emulator on `settings.portal_host:settings.portal_port`, served by uvicorn in a task
    of the current event loop. `start()` returns once connections are accepted."""

    def __init__(self, settings: Settings, portal: Portal | None = None) -> None:
        self.settings = settings
        self.portal = portal or Portal(settings)
        self._server: EmbeddedServer | None = None

    @property
    def base_url(self) -> str:
        host = self.settings.portal_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - only names the address
            host = "127.0.0.1"
        return f"http://{host}:{self.settings.portal_port}"

    async def start(self) -> str:
        await self.portal.open()
        server = EmbeddedServer(
            create_app(self.settings, self.portal),
            self.settings.portal_host,
            self.settings.portal_port,
            port_setting="PORTAL_PORT",
            http=_protocol_for(self.portal),
            lifespan="on",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        try:
            await server.start()
        except BaseException:
            await self.portal.close()
            raise
        self._server = server
        return self.base_url

    async def stop(self) -> None:
        if self._server is None:
            return
        self.portal.stop_waiting()
        await self._server.stop()
        await self.portal.close()
        self._server = None

    async def __aenter__(self) -> PortalServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def serve_portal(settings: Settings, portal: Portal | None = None) -> AsyncIterator[str]:
    """`async with serve_portal(settings) as base_url:` — the emulator for the block's duration."""
    async with PortalServer(settings, portal) as server:
        yield server.base_url


async def _serve_until_stopped(settings: Settings) -> None:
    server = PortalServer(settings)
    await server.start()
    log.info(
        "Bitrix24 portal emulator listening",
        url=server.base_url,
        rate_limit=settings.portal_rate_limit,
        state_file=settings.portal_state_file,
    )
    try:
        await wait_for_stop_signal()
    finally:
        await server.stop()
    log.info("Bitrix24 portal emulator stopped")


def run(settings: Settings) -> None:
    configure_logging(
        settings.log_level,
        settings.log_json,
        secrets=[settings.portal_webhook.get_secret_value()],
        personal_data=settings.log_pii,
    )
    uvloop.run(_serve_until_stopped(settings))
