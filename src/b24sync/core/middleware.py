"""Around the app, on the raw request: the body's size, the query's encoding, the access log."""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from b24sync.logs import get_logger, shorten

log = get_logger(__name__)

MAX_BODY_BYTES = 16 * 1024
# Query parameters whose values are never logged.
_SECRET_PARAMETER = re.compile(r"token|secret|passw|auth|key|code|signature|session", re.I)
_LOGGED_TARGET_CHARS = 500


class BodySizeLimitMiddleware:
    """Answers 413 to bodies over the limit, whether announced by Content-Length or chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                if int(value) > self.max_bytes:
                    await self._reject(send)
                    return
                # The server delivers exactly Content-Length bytes: nothing left to count.
                await self.app(scope, receive, send)
                return
        # Small bodies are read here in full and replayed to the app, so a chunked body that
        # turns out too large is refused before anything ran.
        messages, body = await read_body(receive, self.max_bytes)
        if body is None and messages[-1]["type"] == "http.request":
            await self._reject(send)
            return
        await self.app(scope, replaying(messages, receive), send)

    async def _reject(self, send: Send) -> None:
        await send_json(send, 413, {"detail": f"Request body larger than {self.max_bytes} bytes"})


class QueryEncodingMiddleware:
    """Answers 422 to a query parameter whose bytes are not UTF-8 text (`%FF`, or `%ED%A0%80`:
    a lone surrogate written as UTF-8). Starlette would read each such byte as U+FFFD and
    filter by that, answering as if the request were fine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query: bytes = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if b"%" in query or not query.isascii():
            # Latin-1 maps byte to character and back: each part's own bytes, to decode here.
            for name, value in parse_qsl(
                query.decode("latin-1"), keep_blank_values=True, encoding="latin-1"
            ):
                try:
                    name.encode("latin-1").decode("utf-8")
                    value.encode("latin-1").decode("utf-8")
                except UnicodeDecodeError:
                    readable = name.encode("latin-1").decode("utf-8", errors="replace")
                    error = {
                        "type": "unicode_error",
                        "loc": ["query", readable],
                        "msg": "must be UTF-8 text (percent-encoded bytes included)",
                    }
                    await send_json(send, 422, {"detail": [error]})
                    return
        await self.app(scope, receive, send)


class AccessLogMiddleware:
    """One line per HTTP request: method, path, query (secrets masked), status and duration.
    Never the body nor a header: the `Authorization` token stays out of the logs. The status
    of a request the app failed on without answering is 500, as the server answers it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Bound once, with the logging configured when the app is built: a third cheaper per
        # line than the module's lazy logger, on Core's hottest path.
        self._log = log.bind()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            query: bytes = scope.get("query_string", b"")
            self._log.info(
                "[Core] Request",
                method=scope["method"],
                path=shorten(scope["path"], _LOGGED_TARGET_CHARS),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                **({"query": loggable_query(query)} if query else {}),
            )


def loggable_query(query: bytes) -> str:
    """The query string as sent, with the value of each parameter named like a secret
    (`token`, `api_key`, `password`...) replaced by `***`."""
    parameters = []
    for parameter in query.decode("latin-1").split("&"):
        name, equals, _ = parameter.partition("=")
        parameters.append(f"{name}=***" if equals and _SECRET_PARAMETER.search(name) else parameter)
    return shorten("&".join(parameters), _LOGGED_TARGET_CHARS)


async def read_body(receive: Receive, max_bytes: int) -> tuple[list[Message], bytes | None]:
    """Reads the request's messages up to the end of its body; returns them (to replay) and the
    body, or None when the client left or the body grew over `max_bytes` (the last message
    read tells which)."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return messages, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """`receive` for the next app: the messages already read, then the rest of the request."""

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


async def send_json(send: Send, status: int, content: Any) -> None:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    await send_body(send, status, body)


async def send_body(send: Send, status: int, body: bytes) -> None:
    """A whole JSON answer."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
