"""BullMQ's worker, fetching jobs with a loop of its own.

BullMQ's own loop (`Worker.run`) starts one fetch per free slot whenever it wakes: with room
for many jobs that is a `moveToActive` script call per slot, twice, for every job that comes
in at light load. Here one fetch runs at a time: it takes the next job, or waits for one on
BullMQ's marker (BZPOPMIN), while up to `max_jobs` jobs are processed. Locks, stalled-job
checks, retries and events stay BullMQ's.

The blocking wait gets a read timeout longer than BullMQ's longest block (10 s). With redis-py's
default of 5 s, equal to BullMQ's `drainDelay`, the read times out as the server answers; the
connection's retry policy then waits 2, 4, 8, 16 s before waiting for jobs again, so the first
job after a quiet spell sat in the queue for up to that long.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bullmq import Worker
from bullmq.timer import Timer

# Seconds a blocking wait for jobs may read before the connection counts as broken: BullMQ
# blocks for at most 10 s.
BLOCKING_READ_TIMEOUT_S = 15.0


def create_worker(queue_name: str, processor: Any, options: dict[str, Any]) -> Worker:
    """A BullMQ worker for `run_worker` (not started)."""
    worker = Worker(queue_name, processor, {**options, "autorun": False})
    worker.bclient.connection_pool.connection_kwargs["socket_timeout"] = BLOCKING_READ_TIMEOUT_S
    return worker


async def run_worker(worker: Worker, max_jobs: int) -> None:
    """Fetches and processes jobs until `worker.close()`: what `Worker.run` does, with one
    fetch at a time and up to `max_jobs` jobs in processing."""
    await worker._ensure_client_names()
    worker.lockManager.start()
    worker.stalledCheckTimer = Timer(
        worker.opts["stalledInterval"] / 1000, worker.runStalledJobsCheck, worker.emit
    )
    worker.running = True
    serial = 0
    try:
        while not worker.closing:
            if len(worker.processing) >= max_jobs:
                await asyncio.wait(worker.processing, return_when=asyncio.FIRST_COMPLETED)
                continue
            serial += 1
            token = f"{worker.id}:{serial}"

            async def next_job(token: str = token) -> Any:
                return await worker.getNextJob(token)

            job = await worker.retryIfFailed(
                next_job, {"delay_in_ms": worker.opts["runRetryDelay"], "only_emit_error": True}
            )
            if job is not None:
                task = asyncio.ensure_future(worker.processJob(job, job.token))
                worker.processing.add(task)
                task.add_done_callback(worker.processing.discard)
        if worker.processing:
            await asyncio.wait(worker.processing)
    finally:
        worker.running = False
        worker.stalledCheckTimer.stop()
        await worker.lockManager.close()
