"""The batch path of the worker: a processor with ``fetch="batch"`` reads its topics with an
aiokafka consumer of its own that fetches whole batches (``getmany``) instead of a faust agent.

Why: faust delivers every message through its own stream machinery, about 200 µs of CPU per
event on this machine, ten times what the Kafka client needs to fetch and hand over a batch;
at the behaviour topics' rates that was the worker's ceiling (bench/README.md).

What stays the same as the faust path: the batch is handled by ``streams.delivery`` (decode,
DLQ, poison isolation, transient retries, event-time clock); the consumer is in a consumer
group (``<topic_prefix>-worker-<processor>``, its own: faust's group speaks faust's assignor
protocol), so workers side by side share the partitions; it starts from the earliest offset
of a partition the group never committed; the fetch wait is ``worker_fetch_wait_ms``.

Offsets: auto-commit is off. Once a batch is handled (every record applied or dead-lettered)
its partitions' positions become committable, and they are committed every
``worker_commit_seconds``, when partitions are revoked, and when the worker stops. So a crash
redelivers at most what was applied since the last commit, which the processors skip as
duplicates. A rebalance waits (up to ``REVOKE_WAIT_S``) for the batch in flight; one held by a
transient failure is abandoned (``still_ours`` turns false) and left to the next owner.
Stopping the worker cancels the loop at once (also in a retry) and commits what was applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from tailbridge.settings import Settings
from tailbridge.streams.delivery import Delivered, Handler, Tracked
from tailbridge.streams.failures import retry
from tailbridge.streams.processor import Processor
from tailbridge.streams.topics import CONSUMER_HEARTBEAT_MS, CONSUMER_SESSION_TIMEOUT_MS

log = logging.getLogger("tailbridge.worker")
REVOKE_WAIT_S = CONSUMER_SESSION_TIMEOUT_MS / 2000  # well inside the rebalance timeout
STOP_COMMIT_S = 3.0
POLL_MS = 500  # longest getmany wait; the broker answers a fetch after at most the fetch wait anyway
ASSIGNED = "batch consumer assigned"  # logged (at info) after every rebalance: bench/stream_phases/throughput.py


def group_id(settings: Settings, processor: Processor) -> str:
    return f"{settings.topic_prefix}-worker-{processor.name}"


class BatchConsumer(ConsumerRebalanceListener):
    def __init__(self, settings: Settings, processor: Processor, handle: Handler, own: Tracked):
        self.settings, self.processor, self.handle, self.own = settings, processor, handle, own
        self.size = processor.batch_size or settings.worker_batch_size
        self.consumer: AIOKafkaConsumer | None = None
        self.committable: dict = {}  # tp -> offset after the last handled batch's records, not committed yet
        self.committed_at = time.monotonic()
        self.committing: asyncio.Task | None = None  # the periodic commit, off the fetch loop
        self.idle = asyncio.Event()  # no batch in flight
        self.idle.set()
        self.revoking = False

    async def run(self) -> None:
        """Consume until cancelled (the worker stopping)."""
        settings = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=[s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()],
            group_id=group_id(settings, self.processor), client_id=f"tailbridge-worker-{self.processor.name}",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=CONSUMER_SESSION_TIMEOUT_MS, heartbeat_interval_ms=CONSUMER_HEARTBEAT_MS,
            fetch_max_wait_ms=settings.worker_fetch_wait_ms)
        consumer.subscribe(sorted(self.own.topics), listener=self)
        await retry(f"{self.processor.name} consumer start", consumer.start, self.own.progress.status)
        self.consumer = self.own.consumer = consumer
        try:
            while True:
                fetched = await consumer.getmany(timeout_ms=POLL_MS, max_records=self.size)
                if fetched:
                    await self._handle(fetched)
                if self.committable and time.monotonic() - self.committed_at >= settings.worker_commit_seconds \
                        and (self.committing is None or self.committing.done()):
                    self.committing = asyncio.create_task(self._commit())  # not awaited: no wait added to a batch
        finally:  # cancelled too: commit what was applied, leave the group
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._commit_now(), STOP_COMMIT_S)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(consumer.stop(), STOP_COMMIT_S)

    async def _handle(self, fetched: dict) -> None:
        records = [Delivered(tp, m.offset, m.timestamp / 1000, m.key, m.value)
                   for tp, messages in fetched.items() for m in messages]
        partitions = set(fetched)
        self.idle.clear()
        try:
            done = await self.handle(records, lambda: not self.revoking and partitions <= self.consumer.assignment())
        finally:
            self.idle.set()
        if done:
            for tp, messages in fetched.items():
                self.committable[tp] = messages[-1].offset + 1

    async def _commit_now(self) -> None:
        """After the periodic commit in flight, if any: offsets are committed in order."""
        if self.committing is not None:
            with contextlib.suppress(Exception):
                await self.committing
        await self._commit()

    async def _commit(self) -> None:
        if not self.committable:
            return
        offsets = {tp: offset for tp, offset in self.committable.items() if tp in self.consumer.assignment()}
        self.committable = {}
        self.committed_at = time.monotonic()
        if offsets:
            try:
                await self.consumer.commit(offsets)
            except KafkaError as exc:  # membership changed: the next owner redelivers, the processor skips
                for tp, offset in offsets.items():  # unless a later batch moved them on meanwhile
                    self.committable.setdefault(tp, offset)
                log.warning("%s: offsets not committed (%s); those events may be redelivered",
                            self.processor.name, exc)

    async def on_partitions_revoked(self, revoked) -> None:
        self.revoking = True
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), REVOKE_WAIT_S)
            await self._commit_now()
        finally:
            self.revoking = False

    async def on_partitions_assigned(self, assigned) -> None:
        self.own.released.clear()
        log.info("%s: %s %d partitions: %s", self.processor.name, ASSIGNED, len(assigned),
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))
