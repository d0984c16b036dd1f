"""Pure logic of the stream processors: folding user context, windowed item stats, labels."""

import itertools
import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tailbridge.models.data import user_context
from tailbridge.streams import feedback, item_stats
from tailbridge.streams.events import InteractionEvent, QueryEvent, ServedItem
from tailbridge.vocab import PRIOR_CART

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def query(i: int, seconds: float, session="s1", user="u1", text="Sofa") -> QueryEvent:
    return QueryEvent(event_id=f"q{i}", event_time=T0 + timedelta(seconds=seconds), user_id=user, session_id=session,
                      query_id=f"qid{i}", query=text, served=[ServedItem(item_id="a", position=1)])


def act(i: int, seconds: float, action="click", item="a", session="s1", user="u1") -> InteractionEvent:
    return InteractionEvent(event_id=f"e{i}", event_time=T0 + timedelta(seconds=seconds), action=action,
                            user_id=user, session_id=session, query_id="qid0", item_id=item, position=1)


CATEGORY = {"a": "Sofas", "b": "Rugs", "c": "Lamps"}


def fold(events) -> dict:
    state = user_context.new_state()
    for event in events:
        user_context.apply(state, event, CATEGORY.get(getattr(event, "item_id", None)))
    return user_context.feature_row("u1", state)


def scripted_session():
    return [query(0, 0), act(1, 1, "impression"), act(2, 1, "impression", "b"), act(3, 2, "click"),
            act(4, 3, "add_to_cart"), query(5, 10, text="Rug"), act(6, 11, "click", "b"),
            act(7, 12, "purchase"), query(8, 20, session="s2", text="lamp"), act(9, 21, "click", "c", "s2")]


def test_fold_builds_the_expected_context():
    row = fold(scripted_session())
    assert row["recent_item_ids"] == ["c", "a", "b", "a", "a"]  # newest first, no impressions
    assert row["recent_actions"] == ["click", "purchase", "click", "add_to_cart", "click"]
    assert row["recent_queries"] == ["lamp", "rug", "sofa"]
    assert row["session_id"] == "s2" and row["session_queries"] == 1 and row["session_clicks"] == 1
    affinity = dict(zip(row["affinity_categories"], row["affinity_weights"]))
    assert row["affinity_categories"] == ["Sofas", "Rugs", "Lamps"]  # strongest first
    assert sum(affinity.values()) == pytest.approx(1.0)
    assert affinity["Sofas"] > affinity["Rugs"] > 0 and affinity["Lamps"] > 0  # cart + purchase outweigh one click


def test_applying_an_event_twice_changes_nothing():
    events = scripted_session()
    state = user_context.new_state()
    assert all(user_context.apply(state, e, CATEGORY.get(getattr(e, "item_id", None))) for e in events)
    snapshot = orjson.dumps(state)
    assert not any(user_context.apply(state, e, CATEGORY.get(getattr(e, "item_id", None))) for e in events)
    assert orjson.dumps(state) == snapshot


def test_same_timestamp_events_are_all_applied_once():
    impressions = [act(i, 5, "impression", item) for i, item in enumerate("abc")]
    state = user_context.new_state()
    assert [user_context.apply(state, e) for e in impressions] == [True, True, True]
    assert [user_context.apply(state, e) for e in impressions] == [False, False, False]


def assert_same_row(got: dict, want: dict) -> None:
    got, want = dict(got), dict(want)
    assert got.pop("affinity_weights") == pytest.approx(want.pop("affinity_weights"))
    assert got == want


def test_late_events_are_applied_where_their_time_puts_them():
    session = scripted_session()
    stream = [act(100 + i, 40 + 600 * i, "click", "abc"[i % 3], session=f"s{i // 4}") for i in range(40)]
    for events in (session, stream):
        expected = fold(events)
        rng = random.Random(1)
        for _ in range(20):  # each event up to 8 places late
            order = sorted(range(len(events)), key=lambda k: k + rng.uniform(0, 8))
            assert_same_row(fold([events[k] for k in order]), expected)
    late = fold([*session[:3], *session[4:], session[3]])  # the click on "a" at 2 s comes last
    assert late["recent_item_ids"] == fold(session)["recent_item_ids"]


def test_an_event_from_far_ahead_does_not_stop_later_ones():
    state = user_context.new_state()
    assert user_context.apply(state, act(0, 365 * 24 * 3600, "click", "b"))
    later = scripted_session()
    assert all(user_context.apply(state, e, CATEGORY.get(getattr(e, "item_id", None))) for e in later)
    assert not any(user_context.apply(state, e) for e in later)  # and they are still recognised again
    row = user_context.feature_row("u1", state)
    assert row["recent_queries"] == ["lamp", "rug", "sofa"] and state["sessions"]["s2"]["clicks"] == 1
    assert len(row["recent_item_ids"]) == 6 and row["recent_item_ids"][0] == "b"  # one slot, ahead of the rest


def test_redelivery_is_skipped_however_far_back_it_goes():
    events = [act(i, i, "impression", "abc"[i % 3]) for i in range(3 * user_context.MAX_SEEN_IDS)]
    state = user_context.new_state()
    assert all(user_context.apply(state, e) for e in events)
    snapshot = orjson.dumps(state)
    assert not any(user_context.apply(state, e) for e in events)
    assert orjson.dumps(state) == snapshot
    assert len(state["seen"]["interactions"]["ids"]) == user_context.MAX_SEEN_IDS  # the state stays small


def test_a_state_of_another_layout_starts_over():
    assert user_context.restore({"watermarks": {}, "items": [], "queries": ["sofa"]}) == user_context.new_state()
    state = user_context.new_state()
    user_context.apply(state, query(0, 0))
    assert user_context.restore(orjson.loads(orjson.dumps(state))) == orjson.loads(orjson.dumps(state))


def test_result_does_not_depend_on_how_the_two_topics_interleave():
    events = scripted_session()
    queries = [e for e in events if isinstance(e, QueryEvent)]
    actions = [e for e in events if isinstance(e, InteractionEvent)]
    expected = fold(events)
    rng = random.Random(0)
    for _ in range(20):  # random merges that keep each topic's own order
        q, a, merged = list(queries), list(actions), []
        while q or a:
            merged.append((q if q and (not a or rng.random() < 0.5) else a).pop(0))
        assert fold(merged) == expected


def test_recent_items_are_capped_and_affinity_decays():
    events = [act(i, i * 3600, "click", "a" if i < 60 else "b") for i in range(120)]
    row = fold(events)
    assert len(row["recent_item_ids"]) == user_context.MAX_RECENT_ITEMS and set(row["recent_item_ids"]) == {"b"}
    # 60 hours of "b" after 60 hours of "a": the older category has decayed below the newer one
    assert row["affinity_categories"] == ["Rugs", "Sofas"]


def test_item_windows_count_only_what_is_inside():
    now = 10 * 3_600_000
    counters: dict = {}
    for minutes_ago, action in [(5, "impression"), (5, "click"), (90, "impression"), (23 * 60, "impression"),
                                (25 * 60, "impression")]:
        for field in item_stats.bucket_fields(action, now - minutes_ago * 60_000):
            counters[field] = counters.get(field, 0) + 1
    counters[item_stats.LAST_EVENT_FIELD] = now
    row = item_stats.feature_row("a", counters)
    assert (row["impressions_1h"], row["clicks_1h"]) == (1, 1)
    assert (row["impressions_24h"], row["clicks_24h"]) == (3, 1)  # the 25-hour-old one is out
    assert 0 < row["ctr_24h"] < 0.5  # smoothed: 1 click in 3 impressions is not a 33% CTR yet
    assert (row["impressions_7d"], row["clicks_7d"], row["carts_7d"]) == (4, 1, 0)  # the week keeps the 25 h one
    assert 0 < row["cart_rate_7d"] < PRIOR_CART  # 1 click without a cart pulls the prior down, a little
    # minute buckets older than 1 h (90 min, 23 h, 25 h) and the hour bucket older than 24 h
    assert sorted(item_stats.stale_fields(counters, now)) == sorted(
        [f"impressions:1h:{(now - m * 60_000) // 60_000}" for m in (90, 23 * 60, 25 * 60)]
        + [f"impressions:24h:{(now - 25 * 3_600_000) // 3_600_000}"])


def test_labels_take_the_strongest_action_per_served_item():
    served = [ServedItem(item_id=i, position=p, source=s)
              for p, (i, s) in enumerate([("a", "dense"), ("b", "rewrite:couch"), ("c", "bm25"), ("d", "rewrite:settee")], 1)]
    q = QueryEvent(event_id="q", event_time=T0, user_id="u1", session_id="s1", query_id="Q1", query="sofa",
                   served=served, rewrites_used=["couch", "settee"], model_versions={"retriever": "v1"})
    fields = {feedback.QUERY_FIELD: orjson.dumps(q.model_dump(mode="json"))}
    t0_ms = user_context.epoch_ms(T0)
    for item, action, seconds in [("a", "click", 5), ("b", "click", 6), ("b", "add_to_cart", 7), ("b", "purchase", 60),
                                  ("c", "impression", 1), ("d", "click", 61)]:
        fields[feedback.action_field(item, action)] = str(t0_ms + seconds * 1000).encode()
    examples, rewrites = feedback.label_rows(fields, window_s=60)
    assert [(e["item_id"], e["label"]) for e in examples] == [
        ("a", "clicked"), ("b", "purchased"), ("c", "shown_unclicked"), ("d", "shown_unclicked")]  # d: after the window
    assert {r["rewrite"]: r["outcome"] for r in rewrites} == {"couch": "purchased", "settee": "shown_unclicked"}
    examples, _ = feedback.label_rows(fields, window_s=30)  # the window is in event time: the purchase is out
    assert [(e["item_id"], e["label"]) for e in examples][:2] == [("a", "clicked"), ("b", "added_to_cart")]


def test_feedback_log_round_trips_and_dedups(tmp_path):
    q = query(0, 0)
    fields = {feedback.QUERY_FIELD: orjson.dumps(q.model_dump(mode="json")), feedback.action_field("a", "click"): b"1"}
    assert feedback.append(tmp_path, [fields], window_s=60) == (1, 0)
    assert feedback.append(tmp_path, [fields], window_s=60) == (1, 0)  # a re-flush after a crash
    frame = feedback.read_examples(tmp_path)
    assert len(frame) == 1 and frame.loc[0, "label"] == "clicked" and frame.loc[0, "query_id"] == "qid0"
    assert len(list(itertools.chain((tmp_path / "examples").rglob("*.parquet")))) == 2
