"""What a stream processor is, for the worker that runs it (``streams.app``).

A processor is plain data: the topics it reads (names in ``streams.topics.TOPICS``), what it
applies to each batch of parsed events, what it runs periodically (each with its period),
and what it does once at start. All its callables are plain synchronous code; the worker
runs them on a thread and acknowledges an event only after ``apply`` returned for it. Each
returns counts (name -> number) for the worker's periodic report.

Failures (``streams.failures``): a transient one (a dependency down or slow; the worker knows
connection errors and timeouts of Redis, Milvus, gRPC and the OS; a processor names more in
``transient``, or raises ``failures.Unavailable`` for a failure that is not its events' fault)
holds the batch and is retried with backoff. Any other exception from ``apply`` is taken to
come from the events: the worker applies the batch again in smaller groups, in order, and
dead-letters the one event that keeps failing. So ``apply`` must be idempotent and tolerate a
group it applied in part before raising being applied again.

A processor module exposes a factory, ``processor(resources) -> Processor``, and is one line
in ``streams.registry.PROCESSORS``. The factories share one ``Resources`` per worker (the
Redis client, the Feast store, the Milvus client), so processors may stage their writes in
one Redis transaction per batch, as the behaviour processor does for user context, item
counters and open feedback queries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tailbridge.settings import Settings
from tailbridge.streams.event_time import EventClock

Counts = Mapping[str, int]


@dataclass(frozen=True)
class Periodic:
    """Work run every ``every_s`` seconds (the first run one period after start)."""

    name: str
    every_s: float
    run: Callable[[], Counts]


@dataclass(frozen=True)
class Processor:
    name: str  # its consumer's name (and group's, for fetch="batch"): unique in the registry
    topics: tuple[str, ...] = ()  # TOPICS names; none for a processor that only runs periodically
    apply: Callable[[Sequence[Any]], Counts] | None = None  # one batch of parsed events, in order
    batch_size: int | None = None  # at most this many events per batch (None: worker_batch_size)
    periodic: tuple[Periodic, ...] = ()
    start: Callable[[], None] | None = None  # once when the worker starts (e.g. load a model)
    clock: EventClock | None = None  # the worker advances it with each batch, once ``apply`` returned
    transient: tuple[type[BaseException], ...] = ()  # more exceptions of apply that mean "retry later"
    # How the worker reads the topics: "stream", a faust agent; "batch", a consumer of its own that
    # fetches whole batches (``streams.batch_consumer``: far less CPU per event, for high-rate topics).
    fetch: Literal["stream", "batch"] = "stream"

    def __post_init__(self) -> None:
        if bool(self.topics) != (self.apply is not None):
            raise ValueError(f"processor {self.name!r}: topics and apply come together")


@dataclass
class Resources:
    """What the processors of one worker share."""

    settings: Settings
    redis: Any  # redis.Redis: the online store's Redis, where processor state lives
    store: Any  # feast.FeatureStore
    milvus: Any  # pymilvus.MilvusClient
    # Set by whoever writes to Milvus; the index seal (``streams.index_seal``) flushes and clears it.
    milvus_written: threading.Event = field(default_factory=threading.Event)


Factory = Callable[[Resources], Processor]
