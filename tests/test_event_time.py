"""Event time in the stream worker (``streams.event_time``): times too far ahead are clamped,
feedback windows are measured and closed in event time, and an item's category reaches the
shoppers' affinities whenever it comes.

The end-to-end test publishes one simulated session set twice, to a worker that runs while
the events come and to one started only after all were published, and compares the two
feedback logs with the labels the events themselves give.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tailbridge.models.data import user_context
from tailbridge.streams import event_time, item_index
from tailbridge.streams.behaviour import BehaviourProcessor, Keys
from tailbridge.streams.event_time import EventClock
from tailbridge.streams.events import CatalogUpsert, InteractionEvent, QueryEvent
from tailbridge.streams.feedback import read_examples
from tailbridge.streams.indexer import Indexer
from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import simulate
from tailbridge.vocab import LABEL_OF_ACTION, LABELS
from tests.conftest import stream_namespace, wait_until
from tests.test_user_context import whole_log

NOW = datetime.now(UTC)


def click(event_id: str, at: datetime, user="u1", item="a", query_id=None) -> InteractionEvent:
    return InteractionEvent(event_id=event_id, event_time=at, action="click", user_id=user, session_id="s1",
                            item_id=item, query_id=query_id)


def test_an_event_time_too_far_ahead_of_its_arrival_is_clamped_to_it():
    arrival = NOW.timestamp()
    year_ahead = click("e1", NOW + timedelta(days=365))
    clamped, was = event_time.trusted(year_ahead, arrival, max_skew_s=300)
    assert was and clamped.event_time.timestamp() == pytest.approx(arrival) and clamped.event_id == "e1"
    slightly = click("e2", NOW + timedelta(seconds=200))
    assert event_time.trusted(slightly, arrival, max_skew_s=300) == (slightly, False)  # a clock a little fast
    # A record stamped in the future by its producer: the worker's own clock is the arrival.
    clamped, was = event_time.trusted(year_ahead, arrival + 10**7, max_skew_s=300)
    assert was and abs(clamped.event_time.timestamp() - time.time()) < 60
    clamped, was = event_time.trusted(year_ahead, None, max_skew_s=300)
    assert was and abs(clamped.event_time.timestamp() - time.time()) < 60


def test_a_batch_reaches_the_latest_event_time_per_partition():
    reached: event_time.Progress = {}
    for partition, seconds in [(0, 5), (1, 3), (0, 2), (0, 9)]:
        event_time.note(reached, "interactions", partition, click("e", NOW + timedelta(seconds=seconds)))
    base = user_context.epoch_ms(NOW)
    assert reached == {("interactions", 0): base + 9000, ("interactions", 1): base + 3000}


# ---------------------------------------------------------------------- with the real stack


@pytest.mark.integration
def test_the_event_clock_is_the_low_watermark_and_moves_on_when_idle(stack_settings, tmp_path):
    with stream_namespace(stack_settings, tmp_path, "tbclk") as ns:
        key = Keys(ns.settings).event_clock("interactions")
        one, two = (EventClock(ns.redis, key, "interactions", partitions=2, idle_s=1.0) for _ in range(2))  # two workers
        base = event_time.wall_ms() + 3_600_000  # a stream stamped ahead of the wall clock
        assert one.now_ms() is None  # nothing read yet
        one.advance({("interactions", 0): base + 1000, ("queries", 1): base + 99_000})  # queries: not its topic
        assert one.now_ms() is None  # partition 1 has brought nothing yet
        two.advance({("interactions", 1): base + 5000})
        assert one.now_ms() == two.now_ms() == base + 1000  # the partition behind decides
        one.advance({("interactions", 0): base + 500})  # a late batch does not move it back
        one.advance({("interactions", 0): base + 7000})
        assert two.now_ms() == base + 5000
        time.sleep(1.6)
        idle = one.now_ms()  # both partitions quiet for longer than idle_s: their time moves on
        assert base + 5000 + 500 < idle <= base + 5000 + 2000
        time.sleep(0.3)
        assert one.now_ms() >= idle + 250
        fresh = EventClock(ns.redis, key, "interactions", partitions=2, idle_s=1.0)  # a worker (re)started now
        assert fresh.now_ms() == base + 5000  # not idle for a worker that could not read them yet


@pytest.mark.integration
def test_interactions_before_the_items_category_feed_the_affinity_once_it_comes(stack_settings, tmp_path):
    """The behaviour path needs an item's category, not its vectors: the indexer writes the
    category before encoding, and interactions that came even earlier add their affinity then."""
    with stream_namespace(stack_settings, tmp_path, "tbcat") as ns:
        behaviour = BehaviourProcessor(ns.settings, ns.redis, ns.store)
        events = [click("c1", NOW - timedelta(hours=30), item="new_sofa"),
                  click("c2", NOW - timedelta(hours=2), item="new_rug"),
                  click("c3", NOW - timedelta(hours=1), item="new_sofa"),
                  InteractionEvent(event_id="c4", event_time=NOW, action="purchase", user_id="u1", session_id="s1",
                                   item_id="new_rug")]
        assert behaviour.process(events).applied == 4

        def row() -> dict:
            got = ns.store.get_online_features(features=["user_context:recent_item_ids", "user_context:affinity_categories",
                                                         "user_context:affinity_weights"],
                                               entity_rows=[{"user_id": "u1"}]).to_dict()
            return {name: values[0] for name, values in got.items()}

        assert row()["recent_item_ids"] == ["new_rug", "new_sofa", "new_rug", "new_sofa"]
        assert not row()["affinity_categories"]  # no category known yet
        assert behaviour.resolve_categories() == 0

        def no_encoder(version: str):
            raise RuntimeError(f"encoder {version} unavailable")

        catalog = [CatalogUpsert(item_id="new_sofa", title="Harlow Sofa", category_path=["Furniture", "Sofas"], price=499.0),
                   CatalogUpsert(item_id="new_rug", title="Jute Rug", category_path=["Home", "Rugs"], price=99.0)]
        with pytest.raises(RuntimeError, match="unavailable"):
            Indexer(ns.settings, ns.milvus, ns.redis, encoder_loader=no_encoder).process(catalog)
        assert item_index.live_collections(ns.milvus, ns.settings) == {}  # no vectors anywhere
        assert behaviour.resolve_categories() == 4

        expected = user_context.new_state()
        for e in events:  # the fold as if the categories had been known all along
            user_context.apply(expected, e, {"new_sofa": "Sofas", "new_rug": "Rugs"}[e.item_id])
        want = user_context.feature_row("u1", expected)
        got = row()
        assert got["affinity_categories"] == want["affinity_categories"] == ["Rugs", "Sofas"]
        assert got["affinity_weights"] == pytest.approx(want["affinity_weights"], rel=1e-5)
        assert behaviour.resolve_categories() == 0  # added once
        assert behaviour.process(events).duplicates == 4 and behaviour.resolve_categories() == 0  # a redelivery
        assert row()["affinity_weights"] == pytest.approx(want["affinity_weights"], rel=1e-5)
        keys = Keys(ns.settings)
        assert not ns.redis.exists(keys.pending("new_sofa"), keys.pending("new_rug"), keys.pending_items)


def labels_in_event_time(events, window_s: float) -> dict[tuple[str, str], str]:
    """What the log must say: per served item, the strongest action at most ``window_s`` after its search."""
    searches = {e.query_id: e for e in events if isinstance(e, QueryEvent)}
    labels = {(q.query_id, s.item_id): "shown_unclicked" for q in searches.values() for s in q.served}
    for e in events:
        if isinstance(e, InteractionEvent) and e.action in LABEL_OF_ACTION and (e.query_id, e.item_id) in labels \
                and e.event_time <= searches[e.query_id].event_time + timedelta(seconds=window_s):
            labels[(e.query_id, e.item_id)] = max(labels[(e.query_id, e.item_id)], LABEL_OF_ACTION[e.action],
                                                  key=LABELS.index)
    return labels


def applied(ns) -> int:
    return int(ns.redis.get(Keys(ns.settings).applied) or 0)


def label_rows(ns, searches: set[str]) -> list[dict]:
    log = whole_log(ns, searches, read_examples)
    log["rewrites_used"] = log["rewrites_used"].map(list)
    return log.sort_values(["query_id", "item_id"]).to_dict("records")


@pytest.mark.integration
def test_the_feedback_log_is_the_same_live_and_from_a_backlog(stack_settings, tmp_path):
    window_s = 2.5
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    ticks = iter(range(10**9))
    events = list(simulate(synth.generate(items=150, users=60, seed=3), seed=9, sessions=100, concurrent_sessions=4,
                           clock=lambda: start + timedelta(milliseconds=50 * next(ticks))))  # a session spans seconds
    expected = labels_in_event_time(events, window_s)
    searches = {e.query_id for e in events if isinstance(e, QueryEvent)}
    engaged = [e for e in events if isinstance(e, InteractionEvent) and e.action != "impression"]
    late = [e for e in engaged if expected.get((e.query_id, e.item_id)) == "shown_unclicked"]
    assert late and len(late) < len(engaged) / 2  # some engagement falls after its window, most inside
    # A shopper whose client clock is a year ahead, then right again.
    future = [click("f0", datetime.now(UTC) + timedelta(days=365), user="u_future"),
              click("f1", start - timedelta(seconds=2), user="u_future", item="b"),
              click("f2", start - timedelta(seconds=1), user="u_future", item="c")]
    settings = {"feedback_window_seconds": window_s, "worker_flush_seconds": 0.5, "worker_batch_seconds": 0.1,
                "worker_idle_seconds": 10.0}

    with stream_namespace(stack_settings, tmp_path / "live", "tbetl", **settings) as ns:  # reads as events come
        ns.worker.start()
        publish(ns.settings, future)
        wait_until(lambda: applied(ns) == len(future), 120, "the worker to start\n" + ns.worker.log_tail())
        report = publish(ns.settings, events, rate=1000)
        assert report.total == len(events), report.errors
        wait_until(lambda: applied(ns) == len(future) + len(events), 120, "every event\n" + ns.worker.log_tail())
        live = label_rows(ns, searches)
        # The year-ahead click was clamped to its arrival and froze nothing.
        assert "clamped" in ns.worker.log_path.read_text(errors="replace"), ns.worker.log_tail()
        row = ns.store.get_online_features(
            features=["user_context:recent_item_ids", "user_context:recent_action_times_ms"],
            entity_rows=[{"user_id": "u_future"}]).to_dict()
        assert row["recent_item_ids"][0] == ["a", "c", "b"]
        assert max(row["recent_action_times_ms"][0]) <= event_time.wall_ms() + 1000

    with stream_namespace(stack_settings, tmp_path / "backlog", "tbetb", **settings) as ns:  # all waiting at start
        report = publish(ns.settings, events)
        assert report.total == len(events), report.errors
        ns.worker.start()
        wait_until(lambda: applied(ns) == len(events), 120, "every event\n" + ns.worker.log_tail())
        backlog = label_rows(ns, searches)

    assert {(r["query_id"], r["item_id"]): r["label"] for r in live} == expected
    assert live == backlog
