"""The faust-streaming app that `tailbridge worker` runs: several workers side by side share
the partitions of each topic.

Agents take bounded batches (``worker_batch_size``) and hand them to the plain processors in
``streams.behaviour`` and ``streams.indexer`` on a thread, so the event loop keeps
heartbeating. faust acks a batch only after the agent body returns, so offsets are committed
only after the writes they cover. A write that fails is retried with backoff and never acked
meanwhile: a slow or down dependency slows the worker instead of losing events or growing
memory. Events that do not parse go to ``<topic>.dlq`` with the reason in the headers and
the original bytes as the value, and the worker moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import faust
import redis

from tailbridge.feature_repo.store import feature_store
from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.streams.behaviour import BehaviourProcessor
from tailbridge.streams.events import EventValidationError, decode
from tailbridge.streams.indexer import Indexer
from tailbridge.streams.item_index import connect as connect_milvus
from tailbridge.streams.item_index import live_collections
from tailbridge.streams.topics import CONSUMER_HEARTBEAT_MS, CONSUMER_SESSION_TIMEOUT_MS, TOPICS
from tailbridge.settings import Settings

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


def create_app(settings: Settings) -> faust.App:
    app = faust_app(settings)
    redis_client = _redis_for(settings)
    store = feature_store(settings)
    milvus = connect_milvus(settings)
    behaviour = BehaviourProcessor(settings, redis_client, store)
    indexer = Indexer(settings, milvus, redis_client)
    counts: Counter = Counter()

    def topic(*names: str):
        return app.topic(*names, value_serializer="raw", key_serializer="raw")

    specs = {spec.topic(settings): spec for spec in TOPICS.values()}
    dlqs = {name: topic(spec.dlq(settings)) for name, spec in specs.items()}

    async def parse(batch) -> list:
        """Decode a batch; what does not parse goes to the topic's DLQ (awaited, before the ack)."""
        events = []
        for event in batch:
            message = event.message
            try:
                events.append(decode(event.value, allowed=specs[message.topic].events))
            except EventValidationError as exc:
                headers = [("error", str(exc).encode()), ("source_topic", message.topic.encode()),
                           ("source_partition", str(message.partition).encode()),
                           ("source_offset", str(message.offset).encode())]
                sent = await dlqs[message.topic].send(key=event.key, value=event.value, headers=headers, force=True)
                await sent
                counts["dead_lettered"] += 1
                log.warning("dead-lettered %s[%s]@%s: %s", message.topic, message.partition, message.offset, exc)
        return events

    # Queries and interactions are both keyed by user: one agent sees all of a user's events.
    behaviour_topics = topic(TOPICS["queries"].topic(settings), TOPICS["interactions"].topic(settings))

    def on_thread(work: Callable[[], T]) -> Callable[[], Awaitable[T]]:
        return lambda: asyncio.to_thread(work)

    async def handle_behaviour(batch) -> None:
        events = await parse(batch)
        if events:
            result = await asyncio.to_thread(behaviour.process, events)
            counts["applied"] += result.applied
            counts["duplicates"] += result.duplicates

    async def handle_catalog(batch) -> None:
        events = await parse(batch)
        if events:
            result = await asyncio.to_thread(indexer.process, events)
            counts["indexed"] += result.upserted
            counts["deleted"] += result.deleted

    @app.agent(behaviour_topics, name="behaviour")
    async def behaviour_agent(stream):
        async for batch in stream.take_events(settings.worker_batch_size, within=settings.worker_batch_seconds):
            await _retry("behaviour batch", lambda: handle_behaviour(batch))

    @app.agent(topic(TOPICS["catalog"].topic(settings)), name="item_indexer")
    async def indexer_agent(stream):
        async for batch in stream.take_events(min(settings.worker_batch_size, 256), within=settings.worker_batch_seconds):
            await _retry("index batch", lambda: handle_catalog(batch))

    @app.task
    async def warm_up() -> None:
        await _retry("loading the item encoder", on_thread(indexer.warm_up))

    @app.timer(interval=settings.worker_flush_seconds)
    async def flush() -> None:
        counts["item_stats_written"] += await _retry("item stats flush",
                                                     on_thread(lambda: behaviour.flush_item_stats(milvus)))
        examples, _ = await _retry("feedback flush", on_thread(behaviour.flush_feedback))
        counts["feedback_rows"] += examples

    sealed = {"writes": 0}

    @app.timer(interval=settings.worker_index_seal_seconds)
    async def seal_index() -> None:
        """Milvus Lite scans rows not yet flushed by brute force on every search (~30 ms per
        1,000): seal what was written, at most this often, so search stays fast."""
        writes = counts["indexed"] + counts["deleted"] + counts["item_stats_written"]
        if writes != sealed["writes"]:
            await _retry("index flush", on_thread(
                lambda: [milvus.flush(name) for name in live_collections(milvus, settings)]))
            sealed["writes"] = writes

    last_report = {"at": time.monotonic(), "counts": Counter()}

    @app.timer(interval=REPORT_EVERY_S)
    async def report() -> None:
        elapsed = time.monotonic() - last_report["at"]
        delta = counts - last_report["counts"]
        log.warning("last %.0f s: %s", elapsed, ", ".join(f"{k} {v} ({v / elapsed:.0f}/s)" for k, v in sorted(delta.items()))
                    or "idle")
        last_report.update(at=time.monotonic(), counts=counts.copy())

    return app
