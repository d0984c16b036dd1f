"""The drift monitor as a stream processor of its own: ``tailbridge monitor run`` runs it in a
faust app with its own consumer group (``<prefix>-monitor``), so it scales (instances share the
partitions of queries and interactions, each monitoring its share of the shoppers) and fails
without touching the feature worker.

Per batch it feeds the events to ``core.Monitor``, with the Feast rows of a bounded sample of
the users and items they name (``features``: read from Redis in one round trip per batch, each
right after the event that named it), and counts searches, clicks and purchases per query for
the Feast ``query_stats`` view. ``apply`` never fails on an event (the monitor counts
what it cannot use), and never waits on a dependency: the reports and alerts go to an outbox
that a periodic job empties into Redis (``store``: for /monitor and the report), the
``drift_alerts`` topic and the Prometheus gauges, keeping them while a dependency is down.

The reference is the monitor's own warm-up and reference period (``core``): a restarted monitor
learns it again. Redelivered events after a crash are counted again: a few seconds of
double-counted events shift no calibrated test.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from datetime import UTC, datetime

import numpy as np
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from tailbridge.streams.events import DriftAlert, InteractionEvent, QueryEvent, encode
from tailbridge.streams.monitor import store
from tailbridge.streams.monitor.core import Monitor, MonitorConfig, Report
from tailbridge.streams.monitor.features import FEATURES, FeatureReader, Sampler
from tailbridge.streams.monitor.query_stats import QueryStats
from tailbridge.streams.processor import Periodic, Processor, Resources
from tailbridge.streams.topics import TOPICS, make_producer

from tailbridge.settings import Settings
from tailbridge.vocab import normalize_query

log = logging.getLogger("tailbridge.monitor")
OUTBOX = 1000  # reports kept while Redis or the broker is down; older ones are dropped (counted)


class Metrics:
    """The monitor's Prometheus metrics, in a registry of its own (served by `tailbridge monitor run`)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.score = Gauge("tailbridge_drift_score", "Latest drift score of a test on a window",
                           ["test", "window"], registry=self.registry)
        self.threshold = Gauge("tailbridge_drift_threshold", "Calibrated threshold of a test on a window",
                               ["test", "window"], registry=self.registry)
        self.alerts = PromCounter("tailbridge_drift_alerts", "Drift alert onsets", ["test", "window", "severity"],
                                  registry=self.registry)
        self.outcome = Gauge("tailbridge_monitor_outcome", "Outcome rate per model version over the longest window",
                             ["version", "metric"], registry=self.registry)
        self.events = PromCounter("tailbridge_monitor_events", "Events seen by the monitor, and odd ones by kind",
                                  ["kind"], registry=self.registry)
        self.dropped = PromCounter("tailbridge_monitor_reports_dropped", "Reports dropped while outputs were down",
                                   registry=self.registry)

    def update(self, report: dict) -> None:
        for test, windows in report["scores"].items():
            for window, (score, threshold) in windows.items():
                self.score.labels(test, window).set(score)
                if threshold is not None:
                    self.threshold.labels(test, window).set(threshold)
        for alert in report["alerts"]:
            self.alerts.labels(alert["metric"], alert["window"], alert["severity"]).inc()
        for version, rates in report["outcomes"].items():
            for metric, value in rates.items():
                if value is not None:
                    self.outcome.labels(version, metric).set(value)


def _plain(value):
    """numpy numbers as Python ones, for JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


class Outbox:
    def __init__(self, settings: Settings, redis, monitor: Monitor, metrics: Metrics, name: str):
        self.settings, self.redis, self.monitor, self.metrics, self.name = settings, redis, monitor, metrics, name
        self.reports: deque[dict] = deque()
        self.unsent: deque[dict] = deque()  # alerts not yet on the topic
        self.lock = threading.Lock()
        self.producer = None
        self.reported_counts: Counter = Counter()
        self.dropped = 0

    def add(self, reports: list[Report]) -> None:
        with self.lock:
            for report in reports:
                data = _plain(report.as_json())
                self.reports.append(data)
                self.unsent.extend(data["alerts"])
                self.metrics.update(data)
            while len(self.reports) > OUTBOX:
                self.reports.popleft()
                self.dropped += 1
                self.metrics.dropped.inc()
            while len(self.unsent) > OUTBOX:
                self.unsent.popleft()

    def status(self) -> dict:
        m = self.monitor
        thresholds = {f"{test}@{int(w * m.config.bucket_s)}s": round(t.value, 6) for (test, w), t in m.thresholds.items()}
        return {"monitor": self.name, "phase": m.phase, "updated": time.time(), "counts": dict(m.counts),
                "config": {"bucket_s": m.config.bucket_s, "windows_s": [w * m.config.bucket_s for w in m.config.windows],
                           "warmup_s": m.config.warmup_s, "reference_s": m.config.reference_s,
                           "alpha_window": m.config.alpha_window},
                "alpha_test": getattr(m, "alpha_test", None), "tests": [t.name for t in m.tests],
                "thresholds": thresholds, "reports_dropped": self.dropped}

    def flush(self) -> dict[str, int]:
        with self.lock:
            reports, alerts = list(self.reports), [a for r in self.reports for a in r["alerts"]]
            unsent = list(self.unsent)
            counts = Counter(self.monitor.counts)
        delta = counts - self.reported_counts
        for kind, n in delta.items():
            self.metrics.events.labels(kind).inc(n)
        self.reported_counts = counts
        store.write(self.redis, self.settings, reports, alerts, self.status())
        with self.lock:
            for _ in reports:
                self.reports.popleft()
        if unsent:
            self._send(unsent)
            with self.lock:
                for _ in unsent:
                    self.unsent.popleft()
        return {"monitor_reports_written": len(reports), "drift_alerts_published": len(unsent)}

    def _send(self, alerts: list[dict]) -> None:
        if self.producer is None:
            self.producer = make_producer(self.settings, max_block_ms=5000, client_id="tailbridge-monitor")
        topic = TOPICS["drift_alerts"].topic(self.settings)
        as_time = lambda ms: datetime.fromtimestamp(ms / 1000, UTC)
        futures = []
        for a in alerts:
            event = DriftAlert(metric=a["metric"], window=a["window"], window_start=as_time(a["start_ms"]),
                               window_end=as_time(a["end_ms"]), score=a["score"], threshold=a["threshold"],
                               severity=a["severity"], monitor=self.name)
            futures.append(self.producer.send(topic, key=event.key.encode(), value=encode(event)))
        self.producer.flush(timeout=10)
        for future in futures:
            future.get(timeout=1)  # raises if the broker refused it: the job is retried, the alerts kept


def query_encoder(settings: Settings):
    """all-MiniLM-L6-v2's query vectors (ONNX int8, loaded on first use), whichever retriever
    serves: a retriever swap must not read as query drift. Without the model files: hashed
    character trigrams (``models.monitoring.embed``), said in the log."""
    loaded = {}

    if settings.monitor_query_vectors == "hashed":
        from tailbridge.models.monitoring.embed import hashed_trigrams

        return hashed_trigrams

    def embed(texts):
        if "encode" not in loaded:
            try:
                from tailbridge.models.retrieval.encoders import MINILM_VERSION
                from tailbridge.models.retrieval.export import load_item_encoder

                loaded["encode"] = load_item_encoder(MINILM_VERSION, settings.data_dir).encode_queries
            except Exception as exc:  # noqa: BLE001  no model files: the monitor still runs
                from tailbridge.models.monitoring.embed import hashed_trigrams

                log.warning("query vectors: MiniLM not loadable (%s); using hashed character trigrams", exc)
                loaded["encode"] = hashed_trigrams
        return loaded["encode"](texts)

    return embed


def processor(resources: Resources, config: MonitorConfig | None = None, embed=None,
              metrics: Metrics | None = None) -> Processor:
    settings = resources.settings
    config = config or MonitorConfig(
        bucket_s=settings.monitor_bucket_seconds, warmup_s=settings.monitor_warmup_seconds,
        reference_s=settings.monitor_reference_seconds, alpha_window=settings.monitor_alpha_window)
    if embed is None and settings.monitor_query_vectors != "none":
        embed = query_encoder(settings)
    watch_features = settings.monitor_feature_sample > 0
    monitor = Monitor(config, embed, FEATURES if watch_features else None)
    metrics = metrics or Metrics()
    outbox = Outbox(settings, resources.redis, monitor, metrics, f"{socket.gethostname()}:{os.getpid()}")
    query_stats = QueryStats(settings, resources.redis, resources.store)
    sampler = Sampler(config.bucket_s, settings.monitor_feature_sample)
    reader = FeatureReader(resources.redis, resources.store) if watch_features else None

    def feature_rows(events) -> dict[int, list]:
        """The sampled entities' rows, by the index of the event that named them."""
        try:
            picks = [(i, view, entity, event.event_time) for i, event in enumerate(events)
                     for view, entity in sampler.pick(event)]
        except Exception:  # noqa: BLE001  apply never fails on an event: counted, the batch read without rows
            monitor.counts["feature_sample_failed"] += 1
            return {}
        rows = reader.read([pick[1:] for pick in picks]) if picks else []
        if rows is None:
            monitor.counts["feature_rows_unread"] += len(picks)
            return {}
        by_event: dict[int, list] = {}
        for (i, *_), row in zip(picks, rows):
            by_event.setdefault(i, []).append(row)
        return by_event

    def apply(events) -> dict[str, int]:
        before = Counter(monitor.counts)
        rows = feature_rows(events) if reader is not None else {}
        for i, event in enumerate(events):
            outbox.add(monitor.observe(event))
            for row in rows.get(i, ()):
                outbox.add(monitor.observe(row))
            if isinstance(event, QueryEvent):
                query_stats.count(normalize_query(event.query), "search", int(event.event_time.timestamp() * 1000))
            elif (isinstance(event, InteractionEvent) and event.action in ("click", "purchase")
                  and (key := monitor.query_key(event.query_id)) is not None):
                query_stats.count(key, event.action, int(event.event_time.timestamp() * 1000))
        return {f"monitor_{k}": v for k, v in (Counter(monitor.counts) - before).items()}

    return Processor("drift_monitor", topics=("queries", "interactions"), apply=apply,
                     periodic=(Periodic("outbox", 1.0, outbox.flush),
                               Periodic("query_stats", settings.worker_flush_seconds, query_stats.flush)))


def create_monitor_app(settings: Settings, config: MonitorConfig | None = None, embed=None):
    """The faust app of `tailbridge monitor run`: the monitor alone, consumer group ``<prefix>-monitor``."""
    import redis
    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.feature_repo.store import feature_store
    from tailbridge.streams.app import faust_app, install

    online = resolve_online_store(settings)
    if online.kind != "redis":
        raise SystemExit("the monitor keeps its reports and query_stats in Redis; the SQLite online store has none")
    client = redis.Redis.from_url(online.redis_url, socket_timeout=10, socket_connect_timeout=5)
    resources = Resources(settings, client, feature_store(settings), milvus=None)
    app, metrics = faust_app(settings, name="monitor"), Metrics()
    install(app, [processor(resources, config, embed, metrics)], settings, Counter())
    return app, metrics
