"""Prometheus metrics of the query handler, on a registry per app (tests build several apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Milliseconds matter here: most stages take 1-50 ms.
BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.stage_seconds = Histogram("tailbridge_search_stage_seconds", "Time per search stage.", ["stage"],
                                       buckets=BUCKETS, registry=r)
        self.search_seconds = Histogram("tailbridge_search_seconds", "Whole /search time.", buckets=BUCKETS, registry=r)
        self.searches = Counter("tailbridge_searches_total", "Searches answered.", ["personalized"], registry=r)
        self.degraded = Counter("tailbridge_search_degraded_total", "Searches answered without a dependency.",
                                ["dependency"], registry=r)
        self.errors = Counter("tailbridge_search_errors_total", "Searches that failed.", ["reason"], registry=r)
        self.events_published = Counter("tailbridge_events_published_total", "Events the broker acknowledged.",
                                        ["topic"], registry=r)
        self.events_dropped = Counter("tailbridge_events_dropped_total", "Events given up on.", ["reason"], registry=r)
        self.events_rejected = Counter("tailbridge_events_rejected_total", "Events POST /events refused.", ["reason"],
                                       registry=r)
        self.event_buffer = Gauge("tailbridge_event_buffer_size", "Events waiting for the broker.", registry=r)
