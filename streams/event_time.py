"""Event time in the worker: which event times it trusts, and its event-time clock.

Trust. An event's ``event_time`` is whatever its sender wrote. One more than
``max_event_skew_seconds`` ahead of its arrival (the Kafka record's timestamp, or the worker's
clock when that is earlier) is clamped to the arrival time, never dead-lettered: the shopper
did act, only the sender's clock is wrong, and a dead letter would take a real action out of
the features and the labels. The record's timestamp is fixed when the event is published, so
a replay clamps it the same way; the worker counts and logs each clamp.

Clock. A search's feedback window is measured in event time, and it may close only once every
interaction that could fall in it has been applied. A user's interactions come in order on one
partition, so the clock is the low watermark of the interactions topic: the smallest, over its
partitions, of the latest event time applied from each. Not the largest event time seen: in a
backlog one partition (or the queries topic, with far fewer events) runs ahead of the others.
A partition that brought nothing for ``worker_idle_seconds`` (after the worker started) is
idle: from then on its event time moves on with the wall clock, so the searches of a quiet
stream close too. The clock lives in Redis, so workers that share the partitions share it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from itertools import chain
from typing import TypeVar

import redis

from tailbridge.models.data.user_context import epoch_ms

E = TypeVar("E")
Progress = dict[tuple[str, int], int]  # (topic name in TOPICS, partition) -> latest event time of a batch, ms

# KEYS[1]: the clock hash; ARGV: the wall time (ms), then (partition, event ms) pairs. Keeps each
# partition's latest event time and when it last brought events.
_ADVANCE = """
for i = 2, #ARGV, 2 do
  local latest = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '')
  if latest == nil or tonumber(ARGV[i + 1]) > latest then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], ARGV[i] .. ':wall', ARGV[1])
end
"""


def wall_ms() -> int:
    return int(time.time() * 1000)


def seconds_ahead(event_time: datetime, arrival_s: float) -> float:
    return event_time.timestamp() - arrival_s


def trusted(event: E, record_timestamp_s: float | None, max_skew_s: float) -> tuple[E, bool]:
    """The event, with its time clamped to its arrival if it is more than ``max_skew_s`` ahead
    of it; and whether it was clamped."""
    now_s = time.time()
    arrival_s = min(record_timestamp_s, now_s) if record_timestamp_s else now_s
    if seconds_ahead(event.event_time, arrival_s) <= max_skew_s:
        return event, False
    return event.model_copy(update={"event_time": datetime.fromtimestamp(arrival_s, UTC)}), True


def note(progress: Progress, topic: str, partition: int, event) -> None:
    """Count a parsed event into its batch's progress."""
    event_ms = epoch_ms(event.event_time)
    progress[(topic, partition)] = max(progress.get((topic, partition), event_ms), event_ms)


class EventClock:
    """The event-time clock over the partitions of one topic (see the module docstring)."""

    def __init__(self, redis_client: redis.Redis, key: str, topic: str, partitions: int, idle_s: float):
        self.redis, self.key, self.topic, self.partitions = redis_client, key, topic, partitions
        self.idle_ms = int(idle_s * 1000)
        self.started_ms = wall_ms()  # a partition is not idle before the worker could read it
        self._advance = redis_client.register_script(_ADVANCE)

    def advance(self, progress: Progress) -> None:
        """Record a batch the worker has applied (call it only after the batch's writes)."""
        latest = [(partition, ms) for (topic, partition), ms in progress.items() if topic == self.topic]
        if latest:
            self._advance(keys=[self.key], args=[wall_ms(), *chain.from_iterable(latest)])

    def now_ms(self) -> int | None:
        """Every interaction at or before this event time has been applied; None while a
        partition the worker is reading has brought nothing yet."""
        fields = {k.decode(): int(v) for k, v in self.redis.hgetall(self.key).items()}
        wall = wall_ms()
        partitions = set(range(self.partitions)) | {int(k) for k in fields if ":" not in k}
        bounds = []
        for partition in partitions:
            latest = fields.get(str(partition))
            idle_for = wall - max(fields.get(f"{partition}:wall", 0), self.started_ms) - self.idle_ms
            if idle_for <= 0:
                if latest is None:
                    return None
                bounds.append(latest)
            else:  # idle: moves on with the wall clock, from its latest event or from now
                bounds.append(max(wall - self.idle_ms, latest + idle_for if latest is not None else 0))
        return min(bounds, default=wall - self.idle_ms)
