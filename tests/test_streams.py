"""The stream worker end to end: real broker, real Redis (Feast online store), real Milvus,
and `tailbridge worker` as a separate process, as it runs in production."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis

from tailbridge.synthetic import catalog as synth
from tailbridge.models.data import user_context
from tailbridge.streams import item_index
from tailbridge.streams.behaviour import Keys, feedback_dir
from tailbridge.streams.events import CatalogDelete, CatalogUpsert, InteractionEvent, QueryEvent, ServedItem
from tailbridge.streams.feedback import read_examples
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import catalog_events, simulate
from tailbridge.streams.topics import TOPICS, make_consumer, make_producer
from tests.conftest import stream_namespace, wait_until

pytestmark = pytest.mark.integration

USER_FEATURES = ["recent_item_ids", "recent_actions", "recent_action_times_ms", "affinity_categories",
                 "affinity_weights",
                 "recent_queries", "session_id", "session_queries", "session_clicks", "session_carts",
                 "session_purchases"]


@pytest.fixture(scope="module")
def env(stack_settings, tmp_path_factory):
    # The window is in event time: the scripted session's purchase comes 5 s after its search.
    with stream_namespace(stack_settings, tmp_path_factory.mktemp("streams"), "tbs", feedback_window_seconds=10.0,
                          worker_flush_seconds=0.5, worker_batch_seconds=0.1, worker_idle_seconds=3.0) as ns:
        ns.worker.start()
        yield ns.settings, ns.store, ns.redis, ns.worker


def counter(r: redis.Redis, key: str) -> int:
    return int(r.get(key) or 0)


def assert_matches_fold(actual: dict, user: str, state: dict) -> None:
    expected = user_context.feature_row(user, state)
    del expected["user_id"]
    actual = dict(actual)
    assert actual.pop("affinity_weights") == pytest.approx(expected.pop("affinity_weights"))
    assert actual == expected, user


def user_rows(store, users) -> dict[str, dict]:
    got = store.get_online_features(features=[f"user_context:{f}" for f in USER_FEATURES],
                                    entity_rows=[{"user_id": u} for u in users]).to_dict()
    return {u: {f: got[f][i] for f in USER_FEATURES} for i, u in enumerate(users)}


T0 = datetime.now(UTC).replace(microsecond=0)


def scripted(user: str, query_id: str, items=("item_a", "item_b", "item_c")):
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    q = QueryEvent(event_time=at(0), user_id=user, session_id=f"{user}-s", query_id=query_id, query="Blue Sofa",
                   served=[ServedItem(item_id=i, position=p) for p, i in enumerate(items, 1)])
    events = [q] + [InteractionEvent(event_time=at(1), action="impression", user_id=user, session_id=f"{user}-s",
                                     query_id=query_id, item_id=i, position=p) for p, i in enumerate(items, 1)]
    events += [InteractionEvent(event_time=at(2 + n), action=a, user_id=user, session_id=f"{user}-s",
                                query_id=query_id, item_id=i, position=items.index(i) + 1, price=100.0)
               for n, (a, i) in enumerate([("click", items[0]), ("click", items[1]), ("add_to_cart", items[1]),
                                           ("purchase", items[1])])]
    return events


def catalog(items=("item_a", "item_b", "item_c")):
    return [CatalogUpsert(item_id=i, title=f"Harlow Velvet Sofa {i}", category_path=["Furniture", "Sofas"],
                          brand="Harlow", price=499.0) for i in items]


def test_features_appear_and_a_replay_changes_nothing(env):
    settings, store, r, worker = env
    keys = Keys(settings)
    publish(settings, catalog())
    wait_until(lambda: r.hlen(keys.item_category) >= 3, 90, "the catalog to be indexed\n" + worker.log_tail())
    events = scripted("u_feat", "q_feat")
    applied_before = counter(r, keys.applied)
    publish(settings, events)
    wait_until(lambda: counter(r, keys.applied) - applied_before == len(events), 60, "events applied")

    expected = user_context.new_state()
    for e in events:
        user_context.apply(expected, e, "Sofas" if isinstance(e, InteractionEvent) else None)
    row = wait_until(lambda: (rows := user_rows(store, ["u_feat"])["u_feat"])["recent_item_ids"] and rows,
                     10, "user features in Feast")
    assert_matches_fold(row, "u_feat", expected)
    assert row["recent_item_ids"] == ["item_b", "item_b", "item_b", "item_a"]
    assert row["recent_actions"] == ["purchase", "add_to_cart", "click", "click"]
    assert row["recent_queries"] == ["blue sofa"] and row["session_purchases"] == 1
    assert row["affinity_categories"] == ["Sofas"] and row["affinity_weights"] == pytest.approx([1.0])
    stats = wait_until(lambda: (s := store.get_online_features(
        features=["item_stats:impressions_1h", "item_stats:clicks_1h", "item_stats:purchases_24h"],
        entity_rows=[{"item_id": "item_b"}]).to_dict())["impressions_1h"][0] and s, 20, "item stats")
    assert (stats["impressions_1h"][0], stats["clicks_1h"][0], stats["purchases_24h"][0]) == (1, 1, 1)

    # The same events again: recognised as duplicates, nothing changes.
    duplicates_before = counter(r, keys.duplicates)
    publish(settings, events)
    wait_until(lambda: counter(r, keys.duplicates) - duplicates_before == len(events), 60, "the replay to be seen")
    assert counter(r, keys.applied) - applied_before == len(events)
    assert user_rows(store, ["u_feat"])["u_feat"] == row
    time.sleep(2 * settings.worker_flush_seconds)
    again = store.get_online_features(features=["item_stats:impressions_1h", "item_stats:clicks_1h"],
                                      entity_rows=[{"item_id": "item_b"}]).to_dict()
    assert (again["impressions_1h"][0], again["clicks_1h"][0]) == (1, 1)


def test_poison_messages_go_to_the_dlq_and_the_worker_keeps_going(env):
    settings, store, r, worker = env
    spec = TOPICS["interactions"]
    good = scripted("u_poison", "q_poison")[1]
    bad_schema = orjson.dumps(orjson.loads(good.model_dump_json()) | {"position": -3})
    producer = make_producer(settings)
    for raw in (b"{not json", bad_schema):
        producer.send(spec.topic(settings), key=b"u_poison", value=raw)
    producer.flush()
    producer.close()
    publish(settings, [good])
    wait_until(lambda: user_rows(store, ["u_poison"])["u_poison"]["session_id"], 60, "the good event after the poison")

    consumer = make_consumer(settings, spec.dlq(settings), group_id="dlq-check", consumer_timeout_ms=10000)
    try:
        dead = []
        for record in consumer:
            dead.append(record)
            if len(dead) == 2:
                break
    finally:
        consumer.close()
    assert [d.value for d in dead] == [b"{not json", bad_schema]  # the original bytes
    errors = [dict(d.headers)["error"].decode() for d in dead]
    assert "not valid JSON" in errors[0]
    assert "interaction.position" in errors[1]
    assert dict(dead[1].headers)["source_topic"].decode() == spec.topic(settings)


def test_an_item_delete_removes_it_from_search(env):
    settings, store, r, worker = env
    milvus = item_index.connect(settings)
    item = CatalogUpsert(item_id="item_del", title="Quokka Titanium Espresso Tamper 58mm",
                         category_path=["Kitchen", "Coffee"], brand="Quokka", price=39.0)
    publish(settings, [item])

    def found() -> bool:  # on the lexical route, in Milvus or in the term index beside it
        collection = item_index.serving_collection(milvus, settings)
        terms = None if item_index.has_bm25(milvus, collection) else item_index.terms(settings)
        [hits] = item_index.lexical_search(milvus, collection, ["quokka espresso tamper"], 5, "", ["item_id"], 10, terms)
        return any(hit["entity"]["item_id"] == "item_del" for hit in hits)

    wait_until(lambda: item_index.serving_collection(milvus, settings) and found(), 90, "the item to be searchable")
    row = milvus.query(item_index.alias_name(settings), ids=["item_del"], output_fields=["model_version", "brand"])[0]
    assert row["model_version"] == settings.encoder_version and row["brand"] == "Quokka"
    publish(settings, [CatalogDelete(item_id="item_del")])
    wait_until(lambda: not found(), 30, "the item to leave search")
    assert milvus.query(item_index.alias_name(settings), ids=["item_del"], output_fields=["item_id"]) == []


def test_the_feedback_log_labels_a_scripted_session(env):
    settings, store, r, worker = env
    publish(settings, scripted("u_fb", "q_fb", items=("item_x", "item_y", "item_z")))
    def closed() -> list[dict]:
        frame = read_examples(feedback_dir(settings))
        return frame[frame.query_id == "q_fb"].sort_values("position").to_dict("records")

    rows = wait_until(closed, 60, "the feedback window to close")
    assert [(row["item_id"], row["label"]) for row in rows] == [
        ("item_x", "clicked"), ("item_y", "purchased"), ("item_z", "shown_unclicked")]
    assert {(row["user_id"], row["query"]) for row in rows} == {("u_fb", "Blue Sofa")}


def test_kill_9_mid_replay_loses_and_duplicates_nothing(env, tmp_path):
    settings, store, r, worker = env
    keys = Keys(settings)
    dataset = synth.generate(items=200, users=40, seed=11)
    start = datetime.now(UTC)
    ticks = iter(range(10**9))
    clock = lambda: start + timedelta(milliseconds=next(ticks))  # noqa: E731  deterministic, increasing
    publish(settings, list(catalog_events(dataset)))
    wait_until(lambda: all(r.hmget(keys.item_category, [i.item_id for i in dataset.items])), 120,
               "the catalog to be indexed\n" + worker.log_tail())
    events = list(itertools.islice(simulate(dataset, seed=5, clock=clock), 10_000))
    assert len(events) == 10_000

    applied_before = counter(r, keys.applied)
    sender = threading.Thread(target=publish, args=(settings, events), kwargs={"rate": 2500})
    sender.start()
    wait_until(lambda: counter(r, keys.applied) - applied_before >= 3000, 60, "a third of the replay")
    worker.kill9()
    killed_at = counter(r, keys.applied) - applied_before
    sender.join()
    worker.start()
    wait_until(lambda: counter(r, keys.applied) - applied_before == len(events), 180,
               f"all events applied after the restart (killed at {killed_at})\n" + worker.log_tail())
    assert killed_at < len(events)

    # The run without a crash, folded in-process from the same events.
    category = {item.item_id: item.category_path[-1] for item in dataset.items}
    states: dict[str, dict] = {}
    for e in events:
        user_context.apply(states.setdefault(e.user_id, user_context.new_state()), e,
                           category.get(e.item_id) if isinstance(e, InteractionEvent) else None)
    def all_match() -> bool:  # the last batch's Feast write lands just after its Redis commit
        got = user_rows(store, sorted(states))
        return all(got[u]["recent_action_times_ms"] == user_context.feature_row(u, s)["recent_action_times_ms"]
                   for u, s in states.items())

    try:
        wait_until(all_match, 10, "Feast rows to catch up")
    except AssertionError:
        pass  # the comparison below says what differs
    got = user_rows(store, sorted(states))
    for user, state in states.items():
        assert_matches_fold(got[user], user, state)

    impressions = Counter(e.item_id for e in events if isinstance(e, InteractionEvent) and e.action == "impression")
    time.sleep(3 * settings.worker_flush_seconds)
    sample = sorted(impressions)[:50]
    stats = store.get_online_features(features=["item_stats:impressions_24h"],
                                      entity_rows=[{"item_id": i} for i in sample]).to_dict()
    assert stats["impressions_24h"] == [impressions[i] for i in sample]
