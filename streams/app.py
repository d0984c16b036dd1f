"""The faust-streaming app that `tailbridge worker` runs: several workers side by side share
the partitions of each topic.

The worker runs the processors of ``streams.registry.PROCESSORS`` (``streams.processor``):
for each, one consumer of the topics it reads and one timer per periodic job. The consumer is a
faust agent, or for a processor with ``fetch="batch"`` (the high-rate behaviour topics) an
aiokafka consumer that fetches whole batches (``streams.batch_consumer``), run as a task of
the app. Either takes bounded batches (the processor's batch size, else
``worker_batch_size``) and hands them to one handler (``streams.delivery``), which runs the
processor's plain synchronous ``apply`` on a daemon thread, so the event loop keeps
heartbeating and a call stuck in a dead dependency never blocks a stop.

No event may stall the worker (``streams.failures``): events that do not parse, and events
that make ``apply`` fail on their own (after the batch was retried in smaller groups to
find them, and ``worker_poison_attempts`` tries alone), go to ``<topic>.dlq`` with the reason
and their source topic, partition and offset in the headers and the original bytes as the
value; the rest of the batch is applied and the partition moves on. A transient failure (a
dependency down or slow) holds the batch and is retried with backoff, as is any failure of a
periodic job or a start-up step.

Offsets (the batch path's: ``streams.batch_consumer``): the agent holds a reference on each
event's message until the event was applied or dead-lettered, so faust marks an offset committable only after the writes it covers, whatever
``take_events`` acknowledges when a batch ends or is abandoned. Stopping (SIGTERM, SIGINT)
cancels the agents at once, even in a retry; what was applied is committed by the consumer's
last commit and the rest is redelivered (the processors are idempotent). So faust must not
wait for held events before stopping or rebalancing (``stream_wait_empty``): it would wait
forever for a batch that cannot be applied yet.

Every ``heartbeat.HEARTBEAT_S`` the worker writes its status record (``streams.heartbeat``),
and every ``REPORT_EVERY_S`` it logs its counts and what is stuck.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import faust
import redis

from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.feature_repo.store import feature_store
from tailbridge.settings import Settings
from tailbridge.streams import heartbeat
from tailbridge.streams.batch_consumer import BatchConsumer
from tailbridge.streams.delivery import MAX_REASON, Delivered, Handler, Tracked, batch_handler
from tailbridge.streams.failures import Status, on_thread, retry
from tailbridge.streams.heartbeat import WorkerRecord
from tailbridge.streams.item_index import connect as connect_milvus
from tailbridge.streams.kafka_transport import use_fetch_wait
from tailbridge.streams.processor import Factory, Periodic, Processor, Resources
from tailbridge.streams.registry import PROCESSORS
from tailbridge.streams.topics import CONSUMER_HEARTBEAT_MS, CONSUMER_SESSION_TIMEOUT_MS, TOPICS

log = logging.getLogger("tailbridge.worker")
REPORT_EVERY_S = 10.0


def _redis_for(settings: Settings) -> redis.Redis:
    online = resolve_online_store(settings)
    if online.kind != "redis":
        raise SystemExit("the stream worker keeps its state in Redis; the SQLite online store has none "
                         "(set TAILBRIDGE_REDIS_URL to a Redis, or install redis-server and run `tailbridge stack up`)")
    return redis.Redis.from_url(online.redis_url, socket_timeout=10, socket_connect_timeout=5)


class _MilvusOnFirstUse:
    """The Milvus client, connected on first use (and again after a failed attempt): the worker
    starts, and the processors that do not need Milvus run, while Milvus is down."""

    def __init__(self, settings: Settings):
        self._settings, self._client, self._lock = settings, None, threading.Lock()

    def __getattr__(self, name: str):
        with self._lock:
            if self._client is None:
                self._client = connect_milvus(self._settings)
        return getattr(self._client, name)


def faust_app(settings: Settings, name: str = "worker") -> faust.App:
    """The faust app as every tailbridge consumer configures it (agents are added by the caller)."""
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)  # faust makes only the leaf
    app = faust.App(
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
        broker_commit_interval=settings.worker_commit_seconds,
        stream_buffer_maxsize=settings.worker_batch_size * 2,
        stream_wait_empty=False,  # see the module docstring
    )
    use_fetch_wait(app, settings.worker_fetch_wait_ms)
    return app


def create_app(settings: Settings, factories: Sequence[Factory] = PROCESSORS) -> faust.App:
    resources = Resources(settings, _redis_for(settings), feature_store(settings), _MilvusOnFirstUse(settings))
    app = faust_app(settings)
    counts: Counter = Counter()
    tracked = install(app, [factory(resources) for factory in factories], settings, counts)
    _heartbeat(app, settings, tracked, counts)
    return app


def install(app: faust.App, processors: Sequence[Processor], settings: Settings,
            counts: Counter) -> dict[str, Tracked]:
    """A consumer per processor that reads topics (a faust agent, or a task running a batch
    consumer), a timer per periodic job, a task per start-up step. ``counts`` adds up what they
    return; the result tracks each one's progress."""
    names = [p.name for p in processors]
    if len(set(names)) != len(names):
        raise ValueError(f"processor names must be unique: {names}")

    def topic(*names: str):
        return app.topic(*names, value_serializer="raw", key_serializer="raw")

    specs = {spec.topic(settings): spec for spec in TOPICS.values()}
    dlqs = {name: topic(spec.dlq(settings)) for name, spec in specs.items()}

    async def dead_letter(record: Delivered, reason: str, status: Status) -> None:
        """To the topic's DLQ with the reason (awaited: before the offset may be committed)."""
        headers = [("error", reason[:MAX_REASON].encode()), ("source_topic", record.topic.encode()),
                   ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode())]

        async def send() -> None:
            await (await dlqs[record.topic].send(key=record.key, value=record.value, headers=headers, force=True))

        await retry(f"dead-lettering {record.topic}[{record.partition}]@{record.offset}", send, status)
        counts["dead_lettered"] += 1
        log.warning("dead-lettered %s[%s]@%s: %s", record.topic, record.partition, record.offset, reason)

    tracked: dict[str, Tracked] = {}
    for processor in processors:
        topics = frozenset(TOPICS[t].topic(settings) for t in processor.topics)
        own = tracked[processor.name] = Tracked(topics=topics)
        if processor.topics:
            handle = batch_handler(processor, specs, dead_letter, settings, counts, own)
            if processor.fetch == "batch":
                _batch_consumer(app, BatchConsumer(settings, processor, handle, own))
            else:
                _agent(app, processor, topic(*sorted(topics)), handle, settings, own)
        for job in processor.periodic:
            _timer(app, processor.name, job, counts, tracked.setdefault(f"{processor.name}.{job.name}", Tracked()))
        if processor.start is not None:
            _start(app, processor, own)
    return tracked


def _agent(app: faust.App, processor: Processor, channel, handle: Handler, settings: Settings, own: Tracked) -> None:
    size = processor.batch_size or settings.worker_batch_size

    async def agent(stream):
        batches = stream.take_events(size, within=settings.worker_batch_seconds)
        try:
            async for batch in batches:
                for event in batch:
                    event.message.incref()  # held until applied or dead-lettered (see the module docstring)
                records = [Delivered(event.message.tp, event.message.offset, event.message.timestamp, event.key,
                                     event.value, event.ack) for event in batch]
                partitions = {record.tp for record in records}
                await handle(records, lambda: partitions <= app.consumer.assignment())
        finally:  # when cancelled too: ``take_events`` drops its references now, before the last commit
            await batches.aclose()

    app.agent(channel, name=processor.name)(agent)


def _batch_consumer(app: faust.App, consumer: BatchConsumer) -> None:
    app.task(consumer.run)  # started with the app, cancelled when it stops


def _timer(app: faust.App, owner: str, job: Periodic, counts: Counter, own: Tracked) -> None:
    async def tick() -> None:
        counts.update(await retry(f"{owner} {job.name}", lambda: on_thread(job.run), own.progress.status))
        own.progress.last_progress = time.time()

    app.timer(interval=job.every_s, name=f"{owner}.{job.name}")(tick)


def _start(app: faust.App, processor: Processor, own: Tracked) -> None:
    async def start() -> None:
        await retry(f"{processor.name} start", lambda: on_thread(processor.start), own.progress.status)

    app.task(start)


def _heartbeat(app: faust.App, settings: Settings, tracked: dict[str, Tracked], counts: Counter) -> None:
    """The status record every HEARTBEAT_S (``streams.heartbeat``), and the log report every
    REPORT_EVERY_S: counts per second and what is stuck or lagging."""
    client = redis.Redis.from_url(resolve_online_store(settings).redis_url, socket_timeout=1, socket_connect_timeout=1)
    worker, started = heartbeat.worker_id(), time.time()
    last = {"at": time.monotonic(), "counts": Counter()}

    def record() -> WorkerRecord:
        for own in tracked.values():
            own.measure(own.consumer or app.consumer)  # the batch path's own, else faust's
        return WorkerRecord(worker, started, time.time(), {name: own.progress.as_json() for name, own in tracked.items()})

    async def beat() -> None:
        try:
            await on_thread(heartbeat.write, client, settings, record())
        except redis.RedisError as exc:  # the processors that need Redis report it themselves
            log.debug("status record not written: %s", exc)

    async def report() -> None:
        elapsed = time.monotonic() - last["at"]
        delta = counts - last["counts"]
        log.warning("last %.0f s: %s", elapsed, ", ".join(f"{k} {v} ({v / elapsed:.0f}/s)" for k, v in sorted(delta.items()))
                    or "idle")
        for name, issue in heartbeat.problems(record(), settings).items():
            log.warning("%s %s", name, issue)
        last.update(at=time.monotonic(), counts=counts.copy())

    async def forget(*args, **kwargs) -> None:
        try:
            await on_thread(heartbeat.remove, client, settings, worker)
        except redis.RedisError:
            pass  # the record expires by itself

    app.timer(interval=heartbeat.HEARTBEAT_S, name="heartbeat")(beat)
    app.timer(interval=REPORT_EVERY_S, name="report")(report)
    app.on_before_shutdown.connect(forget)
