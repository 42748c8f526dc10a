"""The outbox relay in a process of its own (``OUTBOX_RELAY_PROCESS=true``, the default).

In an HTTP worker the relay shares one event loop, and one CPU share, with the requests: under
full load the requests take nearly all of it and publishing falls behind. In its own process
the relay gets its own share from the operating system. The HTTP workers then run no relay;
they keep the reply consumer.

The process dies with its parent (SIGKILL included): a batch it had not committed is published
again by the next relay, exactly as when the whole of Core is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import uvloop

from b24sync.logs import get_logger
from b24sync.serving import die_with_parent, wait_for_stop_signal
from b24sync.settings import Settings

log = get_logger(__name__)


# How long Core waits for the relay process to come up (a fresh interpreter importing Core)
# before it serves HTTP anyway: writes are safe without a relay, they only wait for one.
READY_TIMEOUT_S = 30.0
BROKER_WAIT_S = 5.0
# The process's name in ps and top (Linux): the relay's CPU told apart from the HTTP side's.
PROCESS_NAME = "b24sync-relay"


def start(settings: Settings) -> BaseProcess:
    """Starts the relay process and returns once it runs, so that Core is not ready to take
    writes a second before anything publishes them."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_main, args=(settings, ready), name="b24sync-outbox-relay")
    process.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.1):
        if not process.is_alive() or time.monotonic() > deadline:
            log.warning(
                "[Core] Outbox relay process did not start",
                pid=process.pid,
                exitcode=process.exitcode,
            )
            break
    return process


def stop(process: BaseProcess, timeout_s: float) -> None:
    if process.is_alive() and process.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()  # SIGTERM: a clean stop; an open batch is rolled back
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()


def _main(settings: Settings, ready: EventType) -> None:
    die_with_parent(signal.SIGKILL)
    with contextlib.suppress(OSError):  # not Linux: the name stays the interpreter's
        Path("/proc/self/comm").write_text(PROCESS_NAME)
    from b24sync.core.main import configure_core_logging, tune_gc

    configure_core_logging(settings)
    tune_gc()
    uvloop.run(_run(settings, ready))


async def _run(settings: Settings, ready: EventType) -> None:
    from b24sync.core.db import create_engine
    from b24sync.core.outbox.relay import Relay

    engine = create_engine(settings)
    relay = Relay(settings, engine)
    task = asyncio.create_task(relay.run(), name="outbox-relay")
    # Ready once it can publish; with RabbitMQ down, soon anyway: it publishes once it is back.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(relay.connected.wait(), BROKER_WAIT_S)
    ready.set()
    try:
        await wait_for_stop_signal()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()
