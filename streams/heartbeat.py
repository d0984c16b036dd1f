"""The worker's status record: how each worker is doing, where others can see it.

Every ``HEARTBEAT_S`` a worker writes one Redis hash, ``tb:<project>:worker:<host>:<pid>``
(expiring after ``HEARTBEAT_TTL_S``, so a killed worker disappears), and its id in the sorted
set ``tb:<project>:workers``. Per processor the record says when it last made progress
(applied or dead-lettered an event, or had nothing to do), how many events it holds and how
many wait in its partitions (from the high-water marks of fetch responses: the broker's
ListOffsets is unreliable on Tansu), how old the oldest event it has not applied is, and since
when it has been retrying what; per periodic job, since when it has been failing.

``problems`` judges a record against the settings: a processor that made no progress for
``worker_stuck_seconds`` while events wait, or a job failing that long, is stuck; one whose
oldest unapplied event is older than ``worker_max_event_age_seconds`` is lagging. The query
handler's /readyz and ``tailbridge worker status`` read the records through ``read_workers``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import redis

from tailbridge.settings import Settings
from tailbridge.streams.behaviour import Keys
from tailbridge.streams.failures import Status

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 30


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def registry_key(settings: Settings) -> str:
    return f"{Keys(settings).root}:workers"


def record_key(settings: Settings, worker: str) -> str:
    return f"{Keys(settings).root}:worker:{worker}"


@dataclass
class Progress:
    """One processor's (or periodic job's) state in this worker; times are epoch seconds."""

    last_progress: float = field(default_factory=time.time)
    held: int = 0  # events received and not yet applied or dead-lettered
    waiting: int | None = None  # events in its partitions not applied yet (None: not measurable)
    oldest_unapplied: float | None = None  # the broker timestamp of the oldest event held
    dead_lettered: int = 0
    status: Status = field(default_factory=Status)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self) | {"retrying_since": self.status.retrying_since, "retrying": self.status.retrying}
        del out["status"]
        return out


@dataclass(frozen=True)
class WorkerRecord:
    worker: str
    started: float
    heartbeat: float
    processors: dict[str, dict[str, Any]]  # name -> Progress.as_json()


def write(client: redis.Redis, settings: Settings, record: WorkerRecord) -> None:
    key = record_key(settings, record.worker)
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(key, mapping={"started": record.started, "heartbeat": record.heartbeat,
                                "processors": orjson.dumps(record.processors)})
        pipe.expire(key, HEARTBEAT_TTL_S)
        pipe.zadd(registry_key(settings), {record.worker: record.heartbeat})
        pipe.execute()


def remove(client: redis.Redis, settings: Settings, worker: str) -> None:
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(record_key(settings, worker))
        pipe.zrem(registry_key(settings), worker)
        pipe.execute()


def read_workers(client: redis.Redis, settings: Settings) -> list[WorkerRecord]:
    """The records of the workers that wrote one within HEARTBEAT_TTL_S (forgetting older ids)."""
    registry = registry_key(settings)
    client.zremrangebyscore(registry, "-inf", time.time() - HEARTBEAT_TTL_S)
    workers = [w.decode() for w in client.zrange(registry, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.hgetall(record_key(settings, worker))
        raw = pipe.execute() if workers else []
    records = []
    for worker, fields in zip(workers, raw):
        if fields:
            records.append(WorkerRecord(worker, float(fields[b"started"]), float(fields[b"heartbeat"]),
                                        orjson.loads(fields[b"processors"])))
    return records


def problems(record: WorkerRecord, settings: Settings, now: float | None = None) -> dict[str, str]:
    """Processor or job name -> what is wrong with it (nothing: absent)."""
    now = time.time() if now is None else now
    found = {}
    for name, p in record.processors.items():
        waiting = max(p["held"], p["waiting"] or 0)
        idle_s = now - p["last_progress"]
        retrying = f" (retrying since {now - p['retrying_since']:.0f} s: {p['retrying']})" if p["retrying_since"] else ""
        if p["retrying_since"] and now - p["retrying_since"] > settings.worker_stuck_seconds and not waiting:
            found[name] = f"stuck: failing for {now - p['retrying_since']:.0f} s: {p['retrying']}"
        elif waiting and idle_s > settings.worker_stuck_seconds:
            found[name] = f"stuck: no progress for {idle_s:.0f} s while {waiting} events wait{retrying}"
        elif p["oldest_unapplied"] and now - p["oldest_unapplied"] > settings.worker_max_event_age_seconds:
            found[name] = f"lagging: its oldest unapplied event is {now - p['oldest_unapplied']:.0f} s old{retrying}"
    return found


def summary(records: Iterable[WorkerRecord], settings: Settings, now: float | None = None) -> str:
    """One line for /readyz: 'ok (...)', 'stuck: ...', 'lagging: ...' or 'none running'."""
    records = list(records)
    if not records:
        return "none running (no worker status record in Redis: features and the index are not being updated)"
    bad = [f"{record.worker} {name} {issue}" for record in records
           for name, issue in problems(record, settings, now).items()]
    if bad:
        worst = "stuck" if any(" stuck: " in line for line in bad) else "lagging"
        return f"{worst}: " + "; ".join(bad)
    waiting = sum(p["waiting"] or 0 for record in records for p in record.processors.values())
    return f"ok ({len(records)} worker{'s' if len(records) > 1 else ''}, {waiting} events waiting)"
