"""One user-context fold, online and offline: the contexts training rebuilds from the feedback
log are the rows the stream worker writes to Feast (``models.data.user_context``).

The fast tests fold in-process (the worker's fold over the events, the trainers' over the log
the worker's labelling makes of them); the integration test replays simulated sessions through
a real `tailbridge worker` and compares its Feast rows with the offline fold of the feedback
log it wrote.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tailbridge.models.data import user_context as uc
from tailbridge.models.data.feedback import FeedbackError, context_at, read_feedback, searches_with_context
from tailbridge.streams import feedback
from tailbridge.streams.behaviour import Keys, feedback_dir
from tailbridge.streams.events import InteractionEvent, QueryEvent
from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import catalog_events, simulate
from tailbridge.vocab import LABEL_OF_ACTION, LABELS
from tests.conftest import stream_namespace, wait_until

ROW_FIELDS = ["recent_item_ids", "recent_actions", "recent_action_times_ms", "affinity_categories", "affinity_weights",
              "recent_queries", "session_id", "session_queries", "session_clicks", "session_carts", "session_purchases"]


def simulated(dataset, sessions: int, seed: int) -> list:
    """Simulated sessions on a millisecond clock, at most one session per user at a time."""
    start = datetime.now(UTC).replace(microsecond=0)
    ticks = iter(range(10**9))
    clock = lambda: start + timedelta(milliseconds=next(ticks))  # noqa: E731
    events = list(simulate(dataset, seed=seed, sessions=sessions, concurrent_sessions=4, clock=clock))
    # Two sessions of one user open at once would interleave their actions, which the log (one
    # time per search) cannot reproduce; with 4 sessions among many users the simulator avoids it.
    spans: dict[str, dict[str, list[int]]] = {}
    for k, e in enumerate(events):
        span = spans.setdefault(e.user_id, {}).setdefault(e.session_id, [k, k])
        span[1] = k
    for user, sessions_of in spans.items():
        ordered = sorted(sessions_of.values())
        assert all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])), f"{user} has overlapping sessions"
    return events


def online_states(events, category) -> dict[str, dict]:
    """What the worker folds (in-process)."""
    states: dict[str, dict] = {}
    for e in events:
        uc.apply(states.setdefault(e.user_id, uc.new_state()), e,
                 category.get(e.item_id) if isinstance(e, InteractionEvent) else None)
    return states


def logged(events, directory):
    """The feedback log the worker writes for these events (its labelling, its parquet), read
    back as the trainers read it."""
    hashes: dict[str, dict] = {}
    for e in events:
        if isinstance(e, QueryEvent):
            hashes.setdefault(e.query_id, {})[feedback.QUERY_FIELD] = orjson.dumps(e.model_dump(mode="json"))
        elif e.query_id and e.action in LABEL_OF_ACTION:
            hashes.setdefault(e.query_id, {})[feedback.action_field(e.item_id, e.action)] = uc.epoch_ms(e.event_time)
    feedback.append(directory, [h for h in hashes.values() if feedback.QUERY_FIELD in h], window_s=3600)
    return read_feedback(directory)


def assert_same_context(online: dict, offline: dict, user: str) -> None:
    """Equal but for what the log cannot hold (``models.data.user_context``): action times are
    the search's (never later than the action), affinities within float tolerance (Feast keeps
    float32; decay counted from the search, not the action)."""
    online, offline = dict(online), dict(offline)
    got = dict(zip(online.pop("affinity_categories"), online.pop("affinity_weights")))
    want = dict(zip(offline.pop("affinity_categories"), offline.pop("affinity_weights")))
    assert got.keys() == want.keys(), user
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6), user
    online_times, offline_times = online.pop("recent_action_times_ms"), offline.pop("recent_action_times_ms")
    assert len(online_times) == len(offline_times) and all(s <= a for s, a in zip(offline_times, online_times)), user
    online.pop("user_id", None), offline.pop("user_id", None)
    assert online == offline, user


# ------------------------------------------------------------------ in-process


@pytest.fixture(scope="module")
def dataset():
    return synth.generate(items=150, users=60, seed=3)


def test_offline_fold_of_the_log_gives_the_online_context(dataset, tmp_path):
    events = simulated(dataset, sessions=120, seed=4)
    category = {it.item_id: it.category_path[-1] for it in dataset.items}
    online = online_states(events, category)
    log = logged(events, tmp_path)
    offline = uc.fold_log(uc.logged_searches(log), category)
    assert offline.keys() == online.keys()
    assert any(s["affinity"] and s["items"] for s in online.values())
    for user in online:
        assert_same_context(uc.feature_row(user, online[user]), uc.feature_row(user, offline[user]), user)
        assert uc.as_context(uc.feature_row(user, offline[user])) == context_at(log, user, category)


def test_a_search_sees_the_context_of_the_searches_before_it(dataset, tmp_path):
    events = simulated(dataset, sessions=40, seed=6)
    category = {it.item_id: it.category_path[-1] for it in dataset.items}
    log = logged(events, tmp_path)
    searches = searches_with_context(log, category)
    times = log.drop_duplicates("query_id").set_index("query_id")["event_time"]
    first = set(log.drop_duplicates("user_id")["query_id"])
    for qid, search in searches.items():
        assert search["context"] == context_at(log, search["user_id"], category, times[qid]), qid
        assert (search["context"] is None) == (qid in first), qid  # a user's later searches have impressions at least
    personalised = [s["context"] for s in searches.values() if s["context"]]
    assert all(sum(c["affinity_weights"]) == pytest.approx(1.0) for c in personalised)


def test_a_logged_row_is_folded_as_the_actions_its_label_stands_for():
    at = datetime(2026, 1, 1, tzinfo=UTC)
    search = uc.LoggedSearch("q1", "Sofa", "u1", "s1", at, (("a", "purchased"), ("b", "shown_unclicked"), ("c", "clicked")))
    assert [(e.type, e.item_id, e.action) for e in uc.search_events(search)] == [
        ("query", "", ""), ("interaction", "a", "impression"), ("interaction", "b", "impression"),
        ("interaction", "c", "impression"), ("interaction", "a", "click"), ("interaction", "a", "add_to_cart"),
        ("interaction", "a", "purchase"), ("interaction", "c", "click")]
    state = uc.new_state()
    uc.fold_search(state, search, {"a": "Sofas", "b": "Rugs", "c": "Sofas"})
    row = uc.feature_row("u1", state)
    assert row["recent_item_ids"] == ["c", "a", "a", "a"] and row["recent_actions"] == [
        "click", "purchase", "add_to_cart", "click"]
    weights = dict(zip(row["affinity_categories"], row["affinity_weights"]))
    assert weights["Rugs"] == pytest.approx(0.05 / (0.05 * 3 + 1 + 3 + 5 + 1))  # an impression counts
    assert (row["session_queries"], row["session_clicks"], row["session_carts"], row["session_purchases"]) == (1, 2, 1, 1)
    again = uc.new_state()
    uc.fold_search(again, search, {"a": "Sofas", "b": "Rugs", "c": "Sofas"})
    uc.fold_search(again, search, {"a": "Sofas", "b": "Rugs", "c": "Sofas"})  # a duplicated log row changes nothing
    assert again == state


# ------------------------------------------------------------------ the real worker


def whole_log(ns, query_ids: set[str], read, timeout: float = 90):
    """The worker's feedback log (read with ``read``) once it holds every one of these searches."""
    def complete():
        if not (feedback_dir(ns.settings) / "examples").is_dir():
            return None
        try:
            log = read(feedback_dir(ns.settings))
        except FeedbackError:  # no file written yet (the folders come first)
            return None
        return [log] if set(log["query_id"]) == query_ids else None

    return wait_until(complete, timeout, "every search in the feedback log\n" + ns.worker.log_tail())[0]


@pytest.mark.integration
def test_the_worker_writes_what_the_offline_fold_of_its_log_gives(stack_settings, tmp_path, dataset):
    with stream_namespace(stack_settings, tmp_path, "tbuc", feedback_window_seconds=3.0, worker_flush_seconds=0.5,
                          worker_batch_seconds=0.1, worker_idle_seconds=3.0) as ns:
        ns.worker.start()
        keys = Keys(ns.settings)
        publish(ns.settings, list(catalog_events(dataset)))
        wait_until(lambda: all(ns.redis.hmget(keys.item_category, [i.item_id for i in dataset.items])), 120,
                   "the catalog to be indexed\n" + ns.worker.log_tail())
        events = simulated(dataset, sessions=150, seed=8)
        report = publish(ns.settings, events)
        assert report.total == len(events), report.errors
        wait_until(lambda: int(ns.redis.get(keys.applied) or 0) == len(events), 120,
                   "every event applied\n" + ns.worker.log_tail())
        log = whole_log(ns, {e.query_id for e in events if isinstance(e, QueryEvent)}, read_feedback)
        # The log holds every engagement (none came after its feedback window closed).
        best: dict[tuple[str, str], str] = {}
        for e in events:
            if isinstance(e, InteractionEvent) and e.action in LABEL_OF_ACTION:
                label = max(LABEL_OF_ACTION[e.action], best.get((e.query_id, e.item_id), "clicked"), key=LABELS.index)
                best[(e.query_id, e.item_id)] = label
        assert {(q, i): label for q, i, label in zip(log["query_id"], log["item_id"], log["label"])
                if label != "shown_unclicked"} == best

        category = {it.item_id: it.category_path[-1] for it in dataset.items}
        offline = {user: uc.feature_row(user, state)
                   for user, state in uc.fold_log(uc.logged_searches(log), category).items()}
        users = sorted(offline)
        assert users == sorted({e.user_id for e in events})

        def online_rows() -> dict[str, dict]:
            got = ns.store.get_online_features(features=[f"user_context:{f}" for f in ROW_FIELDS],
                                               entity_rows=[{"user_id": u} for u in users]).to_dict()
            return {u: {f: got[f][i] for f in ROW_FIELDS} for i, u in enumerate(users)}

        # The last batch's Feast write lands just after its Redis commit.
        try:
            wait_until(lambda: all(r["recent_queries"] == offline[u]["recent_queries"]
                                   and len(r["recent_item_ids"] or []) == len(offline[u]["recent_item_ids"])
                                   for u, r in online_rows().items()), 20, "the Feast rows")
        except AssertionError:
            pass  # the comparison below says what differs
        online = online_rows()
        for user in users:
            assert_same_context(online[user], offline[user], user)
