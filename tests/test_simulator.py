"""Shopper-session simulation (synthetic.shoppers): valid, ordered, behaviourally plausible events."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from tailbridge.synthetic import catalog as synth
from tailbridge.streams.events import CatalogUpsert, InteractionEvent, QueryEvent, decode, encode
from tailbridge.vocab import normalize_query
from tailbridge.synthetic.shoppers import catalog_events, item_converts, simulate

SESSIONS = 600


class StepClock:
    """Deterministic clock: 250 ms per call."""

    def __init__(self, start: datetime = datetime(2025, 1, 1, tzinfo=UTC), step_ms: int = 250):
        self.now, self.step = start, timedelta(milliseconds=step_ms)

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


@pytest.fixture(scope="module")
def dataset() -> synth.SynthDataset:
    return synth.generate(800, 50, seed=5)


@pytest.fixture(scope="module")
def events(dataset) -> list:
    return list(simulate(dataset, seed=9, sessions=SESSIONS, clock=StepClock()))


def test_every_event_validates_and_round_trips(events):
    assert len(events) > 5 * SESSIONS
    kinds = Counter(e.type if isinstance(e, QueryEvent) else e.action for e in events)
    assert set(kinds) == {"query", "impression", "click", "add_to_cart", "purchase"}
    for e in events:
        assert decode(encode(e)) == e
    assert len({e.event_id for e in events}) == len(events)


def test_same_seed_and_clock_reproduce_the_stream_and_another_seed_differs(dataset, events):
    again = [encode(e) for e in simulate(dataset, seed=9, sessions=SESSIONS, clock=StepClock())]
    assert again == [encode(e) for e in events]
    other = [encode(e) for e in simulate(dataset, seed=10, sessions=SESSIONS, clock=StepClock())]
    assert other != again


def test_sessions_pages_and_interleaving(events):
    queries = [e for e in events if isinstance(e, QueryEvent)]
    per_session = Counter(e.session_id for e in queries)
    assert len(per_session) == SESSIONS and set(per_session.values()) <= {1, 2, 3, 4}
    for q in queries:
        assert [s.position for s in q.served] == list(range(1, 11))
        assert len({s.item_id for s in q.served}) == 10
    # Concurrent sessions interleave: consecutive events often come from different users.
    switches = sum(a.user_id != b.user_id for a, b in itertools.pairwise(events))
    assert switches > len(events) / 3
    # One session is one user.
    owners = defaultdict(set)
    for e in events:
        owners[e.session_id].add(e.user_id)
    assert all(len(users) == 1 for users in owners.values())


def test_interactions_refer_to_a_served_search(events):
    served: dict[str, dict[str, int]] = {}
    for e in events:
        if isinstance(e, QueryEvent):
            served[e.query_id] = {s.item_id: s.position for s in e.served}
        else:
            assert e.query_id in served, "interaction before (or without) its search"
            assert served[e.query_id].get(e.item_id) == e.position


def _ctr(dataset, events) -> tuple[dict[int, float], dict[int, float]]:
    by_text = {q.text: q for q in dataset.queries}
    grade_of: dict[tuple[str, str], int] = {}
    for e in events:
        if isinstance(e, QueryEvent):
            q = by_text[normalize_query(e.query)]
            for s in e.served:
                grade_of[(e.query_id, s.item_id)] = dataset.qrels[q.query_id].get(s.item_id, 0)
    shown, clicked = Counter(), Counter()
    shown_g, clicked_g = Counter(), Counter()
    for e in events:
        if isinstance(e, InteractionEvent) and e.action in ("impression", "click"):
            counter, counter_g = (shown, shown_g) if e.action == "impression" else (clicked, clicked_g)
            counter[e.position] += 1
            counter_g[grade_of[(e.query_id, e.item_id)]] += 1
    by_pos = {p: clicked[p] / shown[p] for p in shown}
    by_grade = {g: clicked_g[g] / shown_g[g] for g in shown_g}
    return by_pos, by_grade


def test_click_through_rate_decreases_with_position(dataset, events):
    ctr, _ = _ctr(dataset, events)
    top, middle, bottom = (sum(ctr[p] for p in ps) / len(ps) for ps in ((1, 2, 3), (4, 5, 6), (7, 8, 9, 10)))
    assert top > middle > bottom, (top, middle, bottom)
    assert ctr[1] > 3 * ctr[10]


def test_exact_items_are_clicked_more_than_irrelevant_ones(dataset, events):
    _, ctr = _ctr(dataset, events)
    assert ctr[3] > ctr[2] > ctr[0], ctr
    assert ctr[3] > 3 * ctr[0]


def test_an_items_latent_converts_moves_its_carts_per_click_not_its_clicks(dataset, events):
    """Whether a clicked item sells is decided past the tile (``item_converts``): the items that
    convert best get far more carts per click than those that convert worst, and about the
    same clicks per impression."""
    converts = {it.item_id: item_converts(it.item_id) for it in dataset.items}
    assert converts == {i: item_converts(i) for i in converts}  # a fixed property of the item
    values = sorted(converts.values())
    assert 0.9 < sum(values) / len(values) < 1.1 and values[len(values) * 9 // 10] > 4 * values[len(values) // 10]
    low, high = values[len(values) // 3], values[2 * len(values) // 3]
    counts = defaultdict(Counter)  # tercile -> action -> count
    for e in events:
        if isinstance(e, InteractionEvent):
            c = converts[e.item_id]
            counts["low" if c < low else "high" if c >= high else "middle"][e.action] += 1
    rate = {t: (n["click"] / n["impression"], n["add_to_cart"] / n["click"]) for t, n in counts.items()}
    assert rate["high"][1] > 2.5 * rate["low"][1], rate  # carts per click
    assert 0.8 < rate["high"][0] / rate["low"][0] < 1.25, rate  # clicks per impression


def test_a_pages_click_order_is_not_its_purchase_order(events):
    """The published position-free probabilities: the most clickable item of a page is often not
    the one most likely bought (a perfect click model is not a perfect purchase ranker)."""
    pages = [e.served for e in events if isinstance(e, QueryEvent)]
    differs = sum(max(page, key=lambda s: s.p_click).item_id != max(page, key=lambda s: s.p_purchase).item_id
                  for page in pages)
    assert differs > len(pages) // 4, (differs, len(pages))
    for page in pages:
        assert all(0 <= s.p_purchase <= s.p_cart <= s.p_click <= 1 for s in page)


def test_every_purchase_follows_a_click_and_a_cart_of_the_same_item_in_the_session(events):
    clicked, carted = set(), set()
    purchases = 0
    for e in events:
        if not isinstance(e, InteractionEvent):
            continue
        key = (e.session_id, e.item_id)
        if e.action == "click":
            clicked.add(key)
        elif e.action == "add_to_cart":
            assert key in clicked
            assert e.price is not None and e.price > 0
            carted.add(key)
        elif e.action == "purchase":
            assert key in clicked and key in carted
            assert e.price is not None and e.price > 0
            purchases += 1
    assert purchases > 0
    assert len(carted) < len(clicked)  # not every click becomes a cart


def test_event_times_never_go_backwards_per_user(dataset, events):
    def check(stream):
        last: dict[str, datetime] = {}
        for e in stream:
            assert e.event_time.tzinfo is not None
            assert e.user_id not in last or e.event_time >= last[e.user_id]
            last[e.user_id] = e.event_time
        return last

    assert len(check(events)) > 10
    # Even a clock that jumps backwards cannot make a user's events go back in time.
    ticks = itertools.count()
    base = datetime(2025, 1, 1, tzinfo=UTC)

    def jittery() -> datetime:
        n = next(ticks)
        return base + timedelta(seconds=n if n % 3 else n - 30)

    check(simulate(dataset, seed=1, sessions=100, clock=jittery))


def test_runs_forever_without_a_session_limit(dataset):
    stream = simulate(dataset, seed=3, sessions=None, concurrent_sessions=5, clock=StepClock())
    batch = list(itertools.islice(stream, 20_000))
    assert len(batch) == 20_000
    assert len({e.session_id for e in batch}) > 200


def test_small_pages_and_bad_arguments(dataset):
    events = list(simulate(dataset, seed=2, sessions=20, page_size=3, clock=StepClock()))
    assert all(len(e.served) == 3 for e in events if isinstance(e, QueryEvent))
    with pytest.raises(ValueError):
        next(simulate(dataset, seed=2, concurrent_sessions=0))


def test_catalog_events_cover_the_catalog_with_content_addressed_ids(dataset):
    upserts = list(catalog_events(dataset, clock=StepClock()))
    assert [u.item_id for u in upserts] == [it.item_id for it in dataset.items]
    first = upserts[0]
    assert isinstance(first, CatalogUpsert) and decode(encode(first)) == first
    item = dataset.items[0]
    assert (first.title, first.price, first.attributes) == (item.title, item.price, item.attributes)
    again = list(catalog_events(dataset))
    assert [u.event_id for u in again] == [u.event_id for u in upserts]
    changed = synth.SynthDataset([synth.Item(**{**vars(item), "price": item.price + 1})], [], {}, {}, [])
    assert next(catalog_events(changed)).event_id != first.event_id
