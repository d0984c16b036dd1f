"""Publishing events from the request path without ever blocking it.

``publish`` puts the event in a bounded buffer and returns at once; one background thread owns
the Kafka producer and drains the buffer. A full buffer (broker down or slow for long) drops the
new event and counts it in ``tailbridge_events_dropped_total``, so search keeps answering.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from kafka.errors import KafkaError

from tailbridge.serving.metrics import Metrics
from tailbridge.streams.events import _Event, encode
from tailbridge.streams.topics import make_producer, spec_for
from tailbridge.settings import Settings

log = logging.getLogger(__name__)
RECONNECT_SECONDS = 2.0


class EventPublisher:
    def __init__(self, settings: Settings, metrics: Metrics, capacity: int | None = None):
        self.settings = settings
        self.metrics = metrics
        self._buffer: queue.Queue[tuple[str, bytes, bytes]] = queue.Queue(capacity or settings.serve_event_buffer)
        self._stop = threading.Event()
        self._producer = None
        self.state = "connecting"
        self._thread = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        self._thread.start()

    def publish(self, event: _Event) -> str | None:
        """Queue one event; returns its topic, or None when the buffer is full (dropped)."""
        topic = spec_for(event).topic(self.settings)
        try:
            self._buffer.put_nowait((topic, event.key.encode(), encode(event)))
        except queue.Full:
            self.metrics.events_dropped.labels("buffer_full").inc()
            return None
        self.metrics.event_buffer.set(self._buffer.qsize())
        return topic

    @property
    def pending(self) -> int:
        return self._buffer.qsize()

    def _connect(self) -> None:
        try:
            # max_block_ms bounds how long a send may wait for metadata when the broker is gone.
            self._producer = make_producer(self.settings, max_block_ms=1000, request_timeout_ms=5000,
                                           retries=3, client_id="tailbridge-serving")
            self.state = "ok"
        except KafkaError as exc:
            self.state = f"broker unreachable ({type(exc).__name__}); retrying every {RECONNECT_SECONDS:.0f} s"
            time.sleep(RECONNECT_SECONDS)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._producer is None:
                self._connect()
                continue
            try:
                topic, key, value = self._buffer.get(timeout=0.2)
            except queue.Empty:
                continue
            self.metrics.event_buffer.set(self._buffer.qsize())
            try:
                future = self._producer.send(topic, key=key, value=value)
            except KafkaError as exc:
                self.state = f"send failed: {type(exc).__name__}: {exc}"
                self.metrics.events_dropped.labels("send_failed").inc()
                continue
            future.add_callback(self._sent, topic).add_errback(self._failed)

    def _sent(self, topic: str, _metadata) -> None:
        self.state = "ok"
        self.metrics.events_published.labels(topic).inc()

    def _failed(self, exc: Exception) -> None:
        self.state = f"delivery failed: {type(exc).__name__}: {exc}"
        self.metrics.events_dropped.labels("delivery_failed").inc()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events and give the producer ``timeout`` s to deliver what it holds."""
        deadline = time.monotonic() + timeout
        while self._buffer.qsize() and self._producer is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if self._producer is not None:
            self._producer.close(timeout=max(0.1, deadline - time.monotonic()))
