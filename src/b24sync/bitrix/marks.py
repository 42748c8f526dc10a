"""Which events a live job holds: one hash in Redis, from each event's id (its AMQP message id,
or one derived from its body) to the id of the job that carries it.

A job carries the group of events the consumer took in together, so BullMQ's cost of a job
(about 45 Redis commands to add, fetch and finish it) is shared by the group. The consumer
marks the group's events for the job it is about to add, in one script call; the handler
unmarks them, in one command, once they are answered. So an event that comes again while its
job lives (a redelivery after a crash between the add and the ack, or Core sending it again)
makes no second job, and one that comes after its answer runs again. A mark whose job never
made it to Redis (the consumer died in between) is told apart by the job's absence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

# KEYS[1]: the hash; ARGV[1]: the job id, then the event ids. Marks the events no other job
# holds (those already marked for this job too: a retried add) and returns, for each event,
# '' when marked or the id of the job holding it.
_MARK = """
local held = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
local marks = {}
local out = {}
for i = 1, #held do
  local job = held[i]
  if job == false or job == ARGV[1] then
    marks[#marks + 1] = ARGV[i + 1]
    marks[#marks + 1] = ARGV[1]
    out[i] = ''
  else
    out[i] = job
  end
end
if #marks > 0 then
  redis.call('HSET', KEYS[1], unpack(marks))
end
return out
"""


class EventMarks:
    def __init__(self, redis: Redis, key: str) -> None:
        self._redis = redis
        self._key = key
        self._mark: Any = redis.register_script(_MARK)

    async def mark(self, job_id: str, event_ids: Sequence[str]) -> dict[str, str]:
        """Marks the events for `job_id`, but those another job holds: returned, each with
        the id of that job."""
        if not event_ids:
            return {}
        held = await self._mark(keys=[self._key], args=[job_id, *event_ids])
        return {
            event_id: str(holder)
            for event_id, holder in zip(event_ids, held, strict=True)
            if holder
        }

    async def take_over(self, job_id: str, event_ids: Sequence[str]) -> None:
        """Marks the events for `job_id` whoever held them (a job that is gone or finished)."""
        if event_ids:
            await self._redis.hset(self._key, mapping={event_id: job_id for event_id in event_ids})

    async def unmark(self, event_ids: Sequence[str]) -> None:
        """The events were answered: when they come again, they run again."""
        if event_ids:
            await self._redis.hdel(self._key, *event_ids)
