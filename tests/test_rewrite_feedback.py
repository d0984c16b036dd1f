"""Rewrite feedback (streams/rewrite_feedback.py): the events a closed search yields, their trip
through Kafka, and the per-(query, rewrite) statistics in Redis the handler judges rewrites by."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tailbridge.models.data.user_context import epoch_ms
from tailbridge.models.rewrite_evidence import RouteCounts, verdict
from tailbridge.streams import feedback
from tailbridge.streams.events import QueryEvent, ServedItem, decode
from tailbridge.streams.processor import Resources
from tailbridge.streams.rewrite_feedback import (Emitter, apply_events, decode_stats, events_for, processor,
                                                 stats_key)
from tailbridge.streams.rewrite_store import RewriteWriter

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _closed(query_id: str, actions: dict[str, str], rewrites=("cat shelf",), late: str | None = None) -> dict:
    served = [ServedItem(item_id="a", position=1, source="query"), ServedItem(item_id="b", position=2, source="bm25"),
              ServedItem(item_id="c", position=3, source="rewrite:cat shelf"),
              ServedItem(item_id="d", position=4, source="rewrite:cat shelf"),
              ServedItem(item_id="e", position=5, source="rewrite:counter guard")]
    query = QueryEvent(event_time=T0, user_id="u1", session_id="s1", query_id=query_id,
                       query="Keep Cat Off Counter", served=served, rewrites_used=list(rewrites),
                       model_versions={"rewrites": "rw-2"})
    fields = {feedback.QUERY_FIELD: orjson.dumps(query.model_dump(mode="json"))}
    for item, action in actions.items():
        fields[feedback.action_field(item, action)] = str(epoch_ms(T0 + timedelta(minutes=1)))
    if late:  # after the attribution window: must not count
        fields[feedback.action_field(late, "purchase")] = str(epoch_ms(T0 + timedelta(hours=2)))
    return fields


def test_events_split_the_page_by_route():
    fields = _closed("q1", {"a": "click", "c": "add_to_cart", "d": "click"}, rewrites=("cat shelf", "counter guard"),
                     late="e")
    shelf, guard = events_for(fields, window_s=1800)
    assert (shelf.query_key, shelf.rewrite, shelf.rewriter_version) == ("keep cat off counter", "cat shelf", "rw-2")
    assert (shelf.shown, shelf.engaged, shelf.carts, shelf.purchases) == (2, 2, 1, 0)
    assert (shelf.outcome, shelf.item_id) == ("added_to_cart", "c")
    assert (shelf.original_shown, shelf.original_engaged, shelf.original_carts) == (2, 1, 0)
    assert (guard.shown, guard.engaged, guard.outcome, guard.item_id) == (1, 0, "served", None)  # late purchase ignored
    assert events_for(fields, 1800)[0].event_id == shelf.event_id != guard.event_id  # a re-flush repeats ids
    assert events_for(_closed("q2", {"a": "click"}, rewrites=()), 1800) == []


@pytest.mark.integration
def test_feedback_through_kafka_into_redis_once_per_event(stack_settings, tmp_path):
    import redis

    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.streams.topics import create_topics, make_consumer

    run = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={"topic_prefix": f"tbrwfb-{run}", "feast_project": f"tbrwfb_{run}",
                                                 "data_dir": tmp_path})
    create_topics(settings)
    client = redis.Redis.from_url(resolve_online_store(settings).redis_url)
    client.delete(stats_key(settings, "keep cat off counter"))
    emitter = Emitter(settings)
    try:
        # 16 searches where the rewrite's items are never engaged and the original's are.
        closed = [_closed(f"q{n}", {"a": "click", "b": "purchase"}) for n in range(16)]
        assert emitter.emit(closed) == 16
        assert emitter.emit(closed[:3]) == 3  # a flush repeated after a crash
        consumer = make_consumer(settings, emitter.topic, group_id=None, consumer_timeout_ms=3000)
        events = [decode(m.value) for m in consumer]
        consumer.close()
        assert len(events) == 19
        assert apply_events(client, settings, events[:5]) == 5
        assert verdict(decode_stats(client.hgetall(stats_key(settings, "keep cat off counter")))["cat shelf"]) == \
            "keep"  # 10 items shown: below the minimum of evidence, however bad
        # The live rewrites the handler reads: the failing one first, as the rewriter stored it.
        writer = RewriteWriter(client, settings.feast_project)
        writer.put_many("rw-2", {"keep cat off counter": ["cat shelf", "counter guard"]})
        writer.promote("rw-2")
        apply = processor(Resources(settings, client, None, None)).apply
        assert apply(events) == {"rewrite_feedback_applied": 11, "duplicates": 8,  # the repeats are recognised
                                 "rewrites_demoted": 0, "rewrites_dropped": 1}
        assert client.lrange(writer.live_key("keep cat off counter"), 0, -1) == [b"counter guard"]
        assert writer.get("rw-2", "keep cat off counter") == ["cat shelf", "counter guard"]  # the version's own
        assert apply_events(client, settings, events) == 0
        evidence = decode_stats(client.hgetall(stats_key(settings, "keep cat off counter")))["cat shelf"]
        assert evidence.rewrite == RouteCounts(shown=32, engaged=0, carts=0, purchases=0)
        assert evidence.original == RouteCounts(shown=32, engaged=32, carts=16, purchases=16)
        assert verdict(evidence) == "drop"
    finally:
        if emitter._producer is not None:
            emitter._producer.close()
        for key in client.scan_iter(f"tb:{settings.feast_project}:*"):
            client.delete(key)
