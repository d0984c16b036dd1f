"""Event contracts through the real broker (Tansu embedded, or Kafka in a container)."""

import pytest

from tailbridge.streams.events import decode
from tailbridge.synthetic.replay import publish
from tailbridge.streams.topics import TOPICS, all_topic_names, count_messages, create_topics, make_consumer
from tests.test_events import sample_events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def topics(stack_settings):
    first = create_topics(stack_settings)
    return first


def test_create_topics_is_idempotent(stack_settings, topics):
    assert set(topics) == set(all_topic_names(stack_settings))
    assert set(topics.values()) == {"created"}
    again = create_topics(stack_settings)
    assert again == {name: "exists" for name in topics}


def test_every_event_type_round_trips_through_the_broker(stack_settings, topics):
    events = sample_events()
    report = publish(stack_settings, events)
    assert report.errors == [] and report.total == len(events)

    wanted = {spec.topic(stack_settings): spec for spec in TOPICS.values()}
    consumer = make_consumer(stack_settings, *wanted, group_id="roundtrip", consumer_timeout_ms=15000)
    received = []
    try:
        for record in consumer:
            event = decode(record.value, allowed=wanted[record.topic].events)
            assert record.key.decode() == event.key  # keyed as the registry says
            received.append(event)
            if len(received) == len(events):
                break
    finally:
        consumer.close()
    assert sorted(received, key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)


def test_published_counts_match_what_the_broker_holds(stack_settings, topics):
    catalog = TOPICS["catalog"].topic(stack_settings)
    before = count_messages(stack_settings, [catalog], idle_seconds=1.0)[catalog]
    upserts = [e.model_copy(update={"event_id": f"bulk-{i}", "item_id": f"item_{i}"})
               for i, e in enumerate([sample_events()[3]] * 300)]
    report = publish(stack_settings, upserts, rate=2000)
    assert report.acked[catalog] == 300 and not report.failed
    assert report.seconds >= 300 / 2000 * 0.9  # the rate limit held
    assert count_messages(stack_settings, [catalog], idle_seconds=1.0)[catalog] == before + 300
