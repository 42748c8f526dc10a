"""Serving an ASGI app inside a service's own event loop, the same way in every service."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import signal
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import uvicorn
from pydantic import SecretStr
from starlette.responses import JSONResponse


class _Server(uvicorn.Server):
    # The host program owns SIGTERM/SIGINT. uvicorn's own handling re-raises the signal after
    # shutdown, which ends the process with -SIGTERM instead of exit code 0.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds here rather than in uvicorn, which would exit the process on a busy port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # An explicit IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listener says TCP, and without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class EmbeddedServer:
    """uvicorn serving `app` in a task of the current loop; `start()` returns once it accepts."""

    def __init__(self, app: Any, host: str, port: int, **config: Any) -> None:
        config.setdefault("access_log", False)  # request lines can carry secrets
        config.setdefault("log_config", None)  # keep the structlog handlers
        self.host = host
        self.port = port
        self._server = _Server(uvicorn.Config(app, **config))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = bind_socket(self.host, self.port)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # raises why it could not start
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None


def bearer_token_matches(authorization: str, token: SecretStr) -> bool:
    """Whether an `Authorization` header is `Bearer <token>` (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    expected = token.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


def readiness_response(checks: Mapping[str, bool]) -> JSONResponse:
    """Every service's `/readyz` answer: 200 when every dependency is reachable, 503 otherwise,
    with each one's state ("ok" or "unreachable")."""
    ready = all(checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "not ready",
            "checks": {name: "ok" if ok else "unreachable" for name, ok in checks.items()},
        },
        status_code=200 if ready else 503,
    )


async def wait_for_stop_signal() -> None:
    """Returns on the first SIGINT or SIGTERM."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await stop_requested.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> None:
    """Asks Linux to send `sig` to this process when its parent dies (SIGKILL included), so a
    child process is never left running alone. A no-op where prctl is unavailable."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
