"""Serving an ASGI app inside a service's own event loop, the same way in every service."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import os
import signal
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import uvicorn
from pydantic import SecretStr
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from b24sync.errors import port_in_use


class _Server(uvicorn.Server):
    # The host program owns SIGTERM/SIGINT. uvicorn's own handling re-raises the signal after
    # shutdown, which ends the process with -SIGTERM instead of exit code 0.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int, port_setting: str) -> socket.socket:
    """Binds here rather than in uvicorn, which would exit the process on a busy port; a port
    that cannot be bound raises `StartupError` naming `port_setting` (PORT, ...)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # An explicit IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listener says TCP, and without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise port_in_use(host, port, port_setting, exc) from exc
    return sock


def check_port_free(host: str, port: int, port_setting: str) -> None:
    """Raises `StartupError` naming `port_setting` when `port` cannot be bound on `host` now."""
    bind_socket(host, port, port_setting).close()


class _OneSendPerStep:
    """A connection's transport that sends what is written in one step of the event loop with
    one system call. uvicorn writes a response's head and its body apart, and uvloop sends
    each write at once: two system calls, and two segments for the client, per answer."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._send)
        # A copy of a mutable buffer: the caller may reuse it once `write` returns.
        self._pending.append(data if isinstance(data, bytes) else bytes(data))

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def close(self) -> None:
        self._send()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (several times cheaper per request than h11), sending each
    answer with one system call."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, _OneSendPerStep(transport, self.loop)))


class EmbeddedServer:
    """uvicorn serving `app` in a task of the current loop; `start()` returns once it accepts."""

    def __init__(self, app: Any, host: str, port: int, *, port_setting: str, **config: Any) -> None:
        config.setdefault("http", HttpProtocol)
        config.setdefault("access_log", False)  # request lines can carry secrets
        config.setdefault("log_config", None)  # keep the structlog handlers
        self.host = host
        self.port = port
        self.port_setting = port_setting
        self._server = _Server(uvicorn.Config(app, **config))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = bind_socket(self.host, self.port, self.port_setting)
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


def health_answer() -> dict[str, str | int]:
    """Every service's `/healthz` answer. The process ids tell `b24sync run` that the answer
    came from the child it started (or a worker of it), not from another process on the port."""
    return {"status": "ok", "pid": os.getpid(), "ppid": os.getppid()}


def readiness_response(checks: Mapping[str, bool | str]) -> JSONResponse:
    """Every service's `/readyz` answer: 200 when every dependency is reachable, 503 otherwise,
    with each one's state: "ok", "unreachable", or the reason it cannot be used (a check
    answers a string for that)."""
    ready = all(ok is True for ok in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "not ready",
            "checks": {name: _check_state(ok) for name, ok in checks.items()},
        },
        status_code=200 if ready else 503,
    )


def _check_state(ok: bool | str) -> str:
    if isinstance(ok, str):
        return ok
    return "ok" if ok else "unreachable"


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
