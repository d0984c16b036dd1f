"""Replay, the last step of the demo data: publish events to their Kafka topics at a steady
rate, counting what the broker acknowledged; ``replay_dataset`` sends a demo data set's catalog,
then its simulated shopper sessions."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka.errors import KafkaError

from tailbridge.streams.events import _Event, encode
from tailbridge.streams.topics import make_producer, spec_for
from tailbridge.settings import Settings


@dataclass
class PublishReport:
    acked: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.acked.values())


def publish(
    settings: Settings,
    events: Iterable[_Event],
    rate: float = 0.0,
    on_sent: Callable[[_Event], None] = lambda event: None,
) -> PublishReport:
    """Send each event to its topic, keyed as the registry says; ``rate`` events/s (0: as fast
    as the producer goes). Returns once every send is acknowledged or has failed."""
    report = PublishReport()
    producer = make_producer(settings)
    started = time.monotonic()

    def acked(topic: str):
        return lambda metadata: report.acked.update([topic])

    def failed(topic: str):
        def record(exc: Exception) -> None:
            report.failed.update([topic])
            if len(report.errors) < 10:
                report.errors.append(f"{topic}: {exc}")
        return record

    try:
        for sent, event in enumerate(events):
            if rate > 0:
                # Pace against the schedule, not the previous send, so the rate does not drift.
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            topic = spec_for(event).topic(settings)
            future = producer.send(topic, key=event.key.encode(), value=encode(event))
            future.add_callback(acked(topic)).add_errback(failed(topic))
            on_sent(event)
        producer.flush()
    except KafkaError as exc:
        report.errors.append(f"producer: {exc}")
    finally:
        producer.close(timeout=10)
        report.seconds = time.monotonic() - started
    return report


def replay_dataset(settings: Settings, dataset, rate: float, events: int, seed: int, catalog: bool = True,
                   on_catalog: Callable[[_Event], None] = lambda e: None,
                   on_behaviour: Callable[[_Event], None] = lambda e: None, drift=None) -> list[PublishReport]:
    """The demo catalog as upserts (at full speed), then ``events`` simulated behaviour events
    (queries, impressions, clicks, carts, purchases) at ``rate`` per second; with ``drift`` (a
    ``synthetic.drift.DriftSpec``) the stream drifts that way from its time T on."""
    from tailbridge.synthetic.shoppers import catalog_events, simulate

    reports = [publish(settings, catalog_events(dataset), on_sent=on_catalog)] if catalog else []
    if drift is not None:  # its module loads the monitor's Feast views: only when asked for
        from tailbridge.synthetic.drift import with_drift

        stream = with_drift(dataset, seed, drift)
    else:
        stream = simulate(dataset, seed=seed)
    behaviour = itertools.islice(stream, events)
    return reports + [publish(settings, behaviour, rate=rate, on_sent=on_behaviour)]
