"""The services' HTTP protocol: an answer goes out with one system call, on a real server."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from b24sync.serving import EmbeddedServer, _OneSendPerStep
from tests.conftest import free_port


class _Socket(asyncio.Transport):
    """What reaches the socket: each write the transport is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_writes_of_one_step_of_the_loop_leave_in_one_send() -> None:
    socket = _Socket()
    transport = _OneSendPerStep(socket, asyncio.get_running_loop())

    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert socket.sent == []
    await asyncio.sleep(0)

    assert socket.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert socket.sent[1:] == [b"next"]


async def test_closing_sends_what_is_waiting_first_and_only_once() -> None:
    socket = _Socket()
    transport = _OneSendPerStep(socket, asyncio.get_running_loop())

    transport.write(b"last answer")
    transport.close()
    await asyncio.sleep(0)

    assert socket.sent == [b"last answer"]
    assert socket.closed


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = scope["path"].encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_answers_arrive_whole_on_a_kept_connection_and_on_one_closed_after() -> None:
    port = free_port()
    server = EmbeddedServer(_answer, "127.0.0.1", port, port_setting="PORT", lifespan="off")
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answers = [await client.get(f"/answer/{n}") for n in range(3)]
            closing = await client.get("/closing", headers={"connection": "close"})
    finally:
        await server.stop()

    assert [answer.text for answer in answers] == ["/answer/0", "/answer/1", "/answer/2"]
    assert closing.text == "/closing"
    assert closing.headers["connection"] == "close"
