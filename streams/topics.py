"""The topic registry: every topic the system uses, what it carries and how it is keyed.

Topic names are ``<prefix>.<name>.v<schema version>`` so an incompatible schema change gets
new topics instead of confusing old consumers. Each topic has a dead-letter twin
``<topic>.dlq`` where processors put what they could not parse, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from tailbridge.streams.events import (
    SCHEMA_VERSION,
    CatalogDelete,
    CatalogUpsert,
    DriftAlert,
    InteractionEvent,
    QueryEvent,
    RewriteFeedback,
    _Event,
)
from tailbridge.settings import Settings

# A consumer-group join on Tansu takes about half of session.timeout.ms (measured): keep it short.
CONSUMER_SESSION_TIMEOUT_MS = 6000
CONSUMER_HEARTBEAT_MS = 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    events: tuple[type[_Event], ...]
    key: str
    description: str

    def topic(self, settings: Settings) -> str:
        return f"{settings.topic_prefix}.{self.name}.v{SCHEMA_VERSION}"

    def dlq(self, settings: Settings) -> str:
        return f"{self.topic(settings)}.dlq"


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        TopicSpec("queries", (QueryEvent,), "user_id", "searches served: query, items and positions shown"),
        TopicSpec("interactions", (InteractionEvent,), "user_id", "impressions, clicks, add-to-carts, purchases"),
        TopicSpec("catalog", (CatalogUpsert, CatalogDelete), "item_id", "product upserts and deletes"),
        TopicSpec("rewrite_feedback", (RewriteFeedback,), "query_key", "outcomes of served query rewrites"),
        TopicSpec("drift_alerts", (DriftAlert,), "metric", "drift monitor alerts: metric, window, score, threshold"),
    )
}


def spec_for(event: _Event) -> TopicSpec:
    return next(spec for spec in TOPICS.values() if isinstance(event, spec.events))


def all_topic_names(settings: Settings) -> list[str]:
    return [name for spec in TOPICS.values() for name in (spec.topic(settings), spec.dlq(settings))]


# How long a client waits for a first broker answer: a broker that is up answers within a
# second even under load; the library's default (30 s) makes a missing stack look like a hang.
BOOTSTRAP_TIMEOUT_MS = 10_000


def _bootstrap(settings: Settings) -> list[str]:
    return [server.strip() for server in settings.kafka_bootstrap.split(",") if server.strip()]


def create_topics(settings: Settings) -> dict[str, str]:
    """Create every topic and its DLQ; returns topic -> 'created' | 'exists'. Idempotent."""
    admin = KafkaAdminClient(bootstrap_servers=_bootstrap(settings), client_id="tailbridge-admin",
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        existing = set(admin.list_topics())
        result: dict[str, str] = {}
        for name in all_topic_names(settings):
            if name in existing:
                result[name] = "exists"
                continue
            try:
                admin.create_topics([NewTopic(name, settings.topic_partitions, 1)])
                result[name] = "created"
            except TopicAlreadyExistsError:  # created by someone else meanwhile
                result[name] = "exists"
        return result
    finally:
        admin.close()


def make_producer(settings: Settings, **overrides) -> KafkaProducer:
    config = dict(
        bootstrap_servers=_bootstrap(settings),
        acks="all",
        linger_ms=5,
        client_id="tailbridge-producer",
        bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
    )
    return KafkaProducer(**(config | overrides))


def make_consumer(settings: Settings, *topics: str, group_id: str | None, **overrides) -> KafkaConsumer:
    config = dict(
        bootstrap_servers=_bootstrap(settings),
        group_id=group_id,
        # 'latest' is unreliable on Tansu (wrong ListOffsets end offset): start from the start.
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=CONSUMER_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=CONSUMER_HEARTBEAT_MS,
        client_id="tailbridge-consumer",
    )
    return KafkaConsumer(*topics, **(config | overrides))


def count_messages(settings: Settings, topics: list[str], idle_seconds: float = 2.0) -> dict[str, int]:
    """Read every topic from the start and count its messages; stops after ``idle_seconds``
    without new records (ListOffsets is unreliable on Tansu, so the end is found by reading)."""
    from kafka import TopicPartition

    consumer = make_consumer(settings, group_id=None, consumer_timeout_ms=int(idle_seconds * 1000))
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        counts = dict.fromkeys(topics, 0)
        for record in consumer:
            counts[record.topic] += 1
        return counts
    finally:
        consumer.close()
