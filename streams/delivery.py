"""What the worker does with a batch of delivered records, whichever consumer delivered it.

Two consumers feed processors (``streams.app``): a faust agent (``Processor.fetch ==
"stream"``) and an aiokafka consumer that fetches whole batches (``"batch"``,
``streams.batch_consumer``). Both turn what they received into ``Delivered`` records and hand
them to the one ``batch_handler``, which decodes each record (what does not parse goes to the
DLQ), clamps event times too far ahead (``streams.event_time``), applies the batch through the
processor with the failure handling of ``streams.failures`` (poison events dead-lettered,
transient failures retried), and advances the processor's event-time clock once the batch is
applied. ``Tracked`` keeps, per processor, which records are held (received, not yet applied
or dead-lettered) for the worker's status record (``streams.heartbeat``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tailbridge.settings import Settings
from tailbridge.streams import event_time
from tailbridge.streams.events import EventValidationError, decode
from tailbridge.streams.failures import Status, apply_isolating, describe, is_transient, on_thread, retry
from tailbridge.streams.heartbeat import Progress
from tailbridge.streams.processor import Processor
from tailbridge.streams.topics import TopicSpec

log = logging.getLogger("tailbridge.worker")
MAX_REASON = 4000  # characters of the error header


@dataclass(frozen=True, slots=True)
class Delivered:
    """One Kafka record as a consumer delivered it."""

    tp: Any  # the consumer's (topic, partition) tuple
    offset: int
    timestamp: float  # the record's timestamp, epoch seconds
    key: bytes | None
    value: bytes
    ack: Callable[[], Any] | None = None  # the faust path: lets faust commit past it

    @property
    def topic(self) -> str:
        return self.tp[0]

    @property
    def partition(self) -> int:
        return self.tp[1]


@dataclass
class Tracked:
    """A processor's (or periodic job's) progress, and for a consumer the records it holds."""

    progress: Progress = field(default_factory=Progress)
    topics: frozenset[str] = frozenset()
    consumer: Any = None  # the batch path's consumer of ``topics`` (None: faust's)
    held: dict = field(default_factory=dict)  # (tp, offset) -> record timestamp (epoch s)
    released: dict = field(default_factory=dict)  # tp -> the offset after the last record released

    def hold(self, records: list[Delivered]) -> None:
        if not self.held:  # waiting starts now: an idle processor was not stuck
            self.progress.last_progress = time.time()
        self.held.update(((r.tp, r.offset), r.timestamp) for r in records)

    def release(self, records: list[Delivered]) -> None:
        """Applied or dead-lettered: their offsets may be committed."""
        held, released = self.held, self.released
        for r in records:
            if r.ack is not None:
                r.ack()
            held.pop((r.tp, r.offset), None)
            if r.offset >= released.get(r.tp, 0):
                released[r.tp] = r.offset + 1
        self.progress.last_progress = time.time()

    def forget(self, records: list[Delivered]) -> None:
        """Abandoned (partition revoked): another worker applies them; they stay uncommitted here."""
        for r in records:
            self.held.pop((r.tp, r.offset), None)

    def measure(self, consumer) -> None:
        progress = self.progress
        progress.held = len(self.held)
        try:
            partitions = [tp for tp in consumer.assignment() if tp.topic in self.topics]
            waiting = None
            for tp in partitions:
                high = consumer.highwater(tp)  # from fetch responses: right on Tansu, unlike ListOffsets
                start = min((offset for (t, offset) in self.held if t == tp), default=self.released.get(tp))
                if high is not None and start is not None:
                    waiting = (waiting or 0) + max(high - start, 0)
        except Exception:  # noqa: BLE001  consumer not started or rebalancing: not measurable now
            waiting = None
        progress.waiting = waiting
        if self.held:
            progress.oldest_unapplied = min(self.held.values())
        elif not waiting:
            progress.oldest_unapplied = None
            progress.last_progress = time.time()  # nothing to do is progress


DeadLetter = Callable[[Delivered, str, Status], Awaitable[None]]
Handler = Callable[[list[Delivered], Callable[[], bool]], Awaitable[bool]]


def batch_handler(processor: Processor, specs: Mapping[str, TopicSpec], dead_letter: DeadLetter, settings: Settings,
                  counts: Counter, own: Tracked) -> Handler:
    """``handle(records, still_ours)``: apply a batch of ``processor``'s records (see the module
    docstring); every record is released once applied or dead-lettered. Returns False, with the
    rest left unapplied and forgotten, if ``still_ours()`` turned false while a transient failure
    was retried (the partitions went to another worker, which applies them)."""
    status = own.progress.status
    allowed = {topic: spec.events for topic, spec in specs.items()}
    names = {topic: spec.name for topic, spec in specs.items()}

    async def apply(group: list) -> dict:
        return await on_thread(processor.apply, [parsed for _, parsed in group])

    def applied(group: list, result) -> None:
        counts.update(result)
        own.release([record for record, _ in group])

    def trusted(record: Delivered, parsed, reached: event_time.Progress):
        """``parsed`` with its time clamped if too far ahead (``streams.event_time``); an event
        not clamped counts into ``reached`` (a clamped one's time is its arrival's, not the stream's)."""
        parsed, clamped = event_time.trusted(parsed, record.timestamp, settings.max_event_skew_seconds)
        if clamped:
            counts["future_event_time_clamped"] += 1
            log.warning("%s[%s]@%s: event_time more than %s s ahead of its arrival, clamped to %s", record.topic,
                        record.partition, record.offset, settings.max_event_skew_seconds, parsed.event_time)
        else:
            event_time.note(reached, names[record.topic], record.partition, parsed)
        return parsed

    async def reject(record: Delivered, reason: str) -> None:
        await dead_letter(record, reason, status)
        own.progress.dead_lettered += 1
        own.release([record])

    async def give_up(item, exc: BaseException) -> None:
        await reject(item[0], f"{processor.name} could not apply it: {describe(exc, MAX_REASON)}")

    async def handle(records: list[Delivered], still_ours: Callable[[], bool]) -> bool:
        own.hold(records)
        items, reached = [], {}  # reached: how far the batch goes in event time per partition
        for record in records:
            try:
                items.append((record, trusted(record, decode(record.value, allowed=allowed[record.topic]), reached)))
            except EventValidationError as exc:
                await reject(record, str(exc))
        done = await apply_isolating(
            items, apply, what=f"{processor.name} batch", attempts=settings.worker_poison_attempts,
            transient=partial(is_transient, extra=processor.transient), applied=applied, give_up=give_up,
            status=status, still_ours=still_ours)
        if done and processor.clock is not None and reached:  # only once the batch's events are applied
            await retry(f"{processor.name} event clock", lambda: on_thread(processor.clock.advance, reached), status)
        if not done:
            log.warning("%s: partitions %s went to another worker; left the rest of the batch to it",
                        processor.name, sorted({r.tp for r in records}))
            own.forget(records)
        return done

    return handle
