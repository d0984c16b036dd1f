"""The faust-streaming app that `tailbridge worker` runs: several workers side by side share
the partitions of each topic.

The worker runs the processors of ``streams.registry.PROCESSORS`` (``streams.processor``):
for each, one agent over the topics it reads and one timer per periodic job. Agents take
bounded batches (the processor's batch size, else ``worker_batch_size``) and hand them to
the processor's plain synchronous ``apply`` on a thread, so the event loop keeps
heartbeating. faust acks a batch only after the agent body returns, so offsets are committed
only after the writes they cover. A write that fails (a batch, a periodic job, a start-up
step) is retried with backoff and, for a batch, never acked meanwhile: a slow or down
dependency slows the worker instead of losing events or growing memory. Events that do not
parse go to ``<topic>.dlq`` with the reason in the headers and the original bytes as the
value, and the worker moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import faust
import redis

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.feature_repo.store import feature_store
from tailbridge.settings import Settings
from tailbridge.streams import event_time
from tailbridge.streams.events import EventValidationError, decode
from tailbridge.streams.item_index import connect as connect_milvus
from tailbridge.streams.processor import Factory, Periodic, Processor, Resources
from tailbridge.streams.registry import PROCESSORS
from tailbridge.streams.topics import CONSUMER_HEARTBEAT_MS, CONSUMER_SESSION_TIMEOUT_MS, TOPICS

log = logging.getLogger("tailbridge.worker")
T = TypeVar("T")
MAX_BACKOFF_S = 10.0
REPORT_EVERY_S = 10.0


def _redis_for(settings: Settings) -> redis.Redis:
    online = resolve_online_store(settings)
    if online.kind != "redis":
        raise SystemExit("the stream worker keeps its state in Redis; the SQLite online store has none "
                         "(set TAILBRIDGE_REDIS_URL to a Redis, or install redis-server and run `tailbridge stack up`)")
    return redis.Redis.from_url(online.redis_url, socket_timeout=10, socket_connect_timeout=5)


async def _retry(what: str, work: Callable[[], Awaitable[T]]) -> T:
    """Await ``work()`` until it succeeds. Nothing may escape an agent's batch body: faust
    acks the batch when the body exits, even by an exception, and those events would be lost."""
    delay = 0.5
    while True:
        try:
            return await work()
        except Exception:
            log.exception("%s failed; retrying in %.1f s (the batch is not acknowledged)", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)


def faust_app(settings: Settings, name: str = "worker") -> faust.App:
    """The faust app as every tailbridge consumer configures it (agents are added by the caller)."""
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)  # faust makes only the leaf
    return faust.App(
        f"{settings.topic_prefix}-{name}",
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
        store="memory://",  # no faust tables: state that must survive lives in Redis, Feast, Milvus
        datadir=str(settings.state_dir / "faust" / "{conf.name}"),  # not the current directory
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,  # several workers side by side on one machine
        topic_allow_declare=False,  # topics come from `tailbridge topics create`
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=CONSUMER_SESSION_TIMEOUT_MS / 1000,
        broker_heartbeat_interval=CONSUMER_HEARTBEAT_MS / 1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=settings.worker_batch_size * 2,
    )


def create_app(settings: Settings, factories: Sequence[Factory] = PROCESSORS) -> faust.App:
    resources = Resources(settings, _redis_for(settings), feature_store(settings), connect_milvus(settings))
    app = faust_app(settings)
    counts: Counter = Counter()
    install(app, [factory(resources) for factory in factories], settings, counts)
    _report(app, counts)
    return app


def install(app: faust.App, processors: Sequence[Processor], settings: Settings, counts: Counter) -> None:
    """An agent per processor that reads topics, a timer per periodic job, a task per start-up
    step. ``counts`` adds up what they return."""
    names = [p.name for p in processors]
    if len(set(names)) != len(names):
        raise ValueError(f"processor names must be unique: {names}")

    def topic(*names: str):
        return app.topic(*names, value_serializer="raw", key_serializer="raw")

    specs = {spec.topic(settings): spec for spec in TOPICS.values()}
    dlqs = {name: topic(spec.dlq(settings)) for name, spec in specs.items()}

    async def parse(batch) -> tuple[list, event_time.Progress]:
        """Decode a batch, clamping event times too far ahead (``streams.event_time``), and say
        how far it goes in event time per partition; what does not parse goes to the topic's
        DLQ (awaited, before the ack)."""
        events, reached = [], {}
        for event in batch:
            message = event.message
            try:
                parsed, clamped = event_time.trusted(decode(event.value, allowed=specs[message.topic].events),
                                                     message.timestamp, settings.max_event_skew_seconds)
            except EventValidationError as exc:
                headers = [("error", str(exc).encode()), ("source_topic", message.topic.encode()),
                           ("source_partition", str(message.partition).encode()),
                           ("source_offset", str(message.offset).encode())]
                sent = await dlqs[message.topic].send(key=event.key, value=event.value, headers=headers, force=True)
                await sent
                counts["dead_lettered"] += 1
                log.warning("dead-lettered %s[%s]@%s: %s", message.topic, message.partition, message.offset, exc)
                continue
            if clamped:  # its time is the arrival's, not the stream's: it says nothing of progress
                counts["future_event_time_clamped"] += 1
                log.warning("%s[%s]@%s: event_time more than %s s ahead of its arrival, clamped to %s", message.topic,
                            message.partition, message.offset, settings.max_event_skew_seconds, parsed.event_time)
            else:
                event_time.note(reached, specs[message.topic].name, message.partition, parsed)
            events.append(parsed)
        return events, reached

    for processor in processors:
        if processor.topics:
            _agent(app, processor, topic(*(TOPICS[t].topic(settings) for t in processor.topics)), parse, settings,
                   counts)
        for job in processor.periodic:
            _timer(app, processor.name, job, counts)
        if processor.start is not None:
            _start(app, processor)


def _agent(app: faust.App, processor: Processor, channel, parse, settings: Settings, counts: Counter) -> None:
    apply = processor.apply
    size = processor.batch_size or settings.worker_batch_size

    async def handle(batch) -> None:
        events, reached = await parse(batch)
        if events:
            counts.update(await asyncio.to_thread(apply, events))
            if processor.clock is not None and reached:  # only once the batch's writes are done
                await asyncio.to_thread(processor.clock.advance, reached)

    async def agent(stream):
        async for batch in stream.take_events(size, within=settings.worker_batch_seconds):
            await _retry(f"{processor.name} batch", lambda: handle(batch))

    app.agent(channel, name=processor.name)(agent)


def _timer(app: faust.App, owner: str, job: Periodic, counts: Counter) -> None:
    async def tick() -> None:
        counts.update(await _retry(f"{owner} {job.name}", lambda: asyncio.to_thread(job.run)))

    app.timer(interval=job.every_s, name=f"{owner}.{job.name}")(tick)


def _start(app: faust.App, processor: Processor) -> None:
    async def start() -> None:
        await _retry(f"{processor.name} start", lambda: asyncio.to_thread(processor.start))

    app.task(start)


def _report(app: faust.App, counts: Counter) -> None:
    last = {"at": time.monotonic(), "counts": Counter()}

    async def report() -> None:
        elapsed = time.monotonic() - last["at"]
        delta = counts - last["counts"]
        log.warning("last %.0f s: %s", elapsed, ", ".join(f"{k} {v} ({v / elapsed:.0f}/s)" for k, v in sorted(delta.items()))
                    or "idle")
        last.update(at=time.monotonic(), counts=counts.copy())

    app.timer(interval=REPORT_EVERY_S, name="report")(report)
