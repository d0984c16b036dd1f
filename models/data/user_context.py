"""The shopper's context: ONE fold, used online by the stream worker and offline by training.

The stream worker (``streams.behaviour``) folds every query and interaction event into a
per-user state and writes ``feature_row(state)`` to the Feast ``user_context`` view. The
trainers rebuild the context a shopper had at each logged search by folding the feedback log
with the same functions (``fold_search`` over ``logged_searches``), so a model trains on the
features it is served: same decay, same impression weighting, same caps, same row.

Folding
    The state is a plain dict (JSON in Redis online), so it survives worker restarts. Folding
    is idempotent: each source ("queries", "interactions") keeps the ids of its
    ``MAX_SEEN_IDS`` latest applied events (by time, then id) and the (time, id) of the latest
    one it forgot. An event whose id is kept is a duplicate; one at or below the forgotten
    (time, id) is too old to tell and is skipped (a redelivery or replay: everything applied
    before the kept ids); any other event is new and applied, late or not. No time watermark
    that one event could push forward: an event from a year ahead takes one of the kept slots
    and nothing else (``streams.event_time`` keeps such times out of the worker anyway).
    Late events are folded where their time puts them, so the result does not depend on the
    order events come in: recent items and queries are ordered by time, and an affinity
    contribution is decayed from its event's time (``add_affinity``). Queries and
    interactions come from two topics whose relative order is arbitrary: recent items and
    affinities come from interactions only, recent queries from queries only, session counters
    are counts per session. Affinity per category is a sum of action weights (impression 0.05,
    click 1, add to cart 3, purchase 5) decayed with a 3-day half-life; the row normalises it.

Events
    ``apply`` reads events through a minimal protocol (``Searched`` / ``Acted``: a ``type`` of
    "query" or "interaction" and a few plain fields). The stream events
    (``streams.events.QueryEvent`` / ``InteractionEvent``) satisfy it as they are; offline the
    log's rows become ``LoggedEvent`` values.

The feedback log, folded as the events it records (``search_events``)
    A logged search (its rows, in page order) is its query, then one impression per served
    item, then per served item in page order the actions its label stands for: clicked is a
    click; added_to_cart a click and an add to cart; purchased a click, an add to cart and a
    purchase (the ladder the search page and the simulator emit). Everything is at the
    search's time. This gives the worker's context exactly (affinities within float tolerance)
    when the worker saw the same events; where it cannot, this is why:

    * times: the log keeps the search's time only, so ``recent_action_times_ms`` are the
      search's, and an action's decay is counted from the search (a relative difference in
      affinity of at most ln 2 x delay / half-life: 1e-4 for a 30-second delay);
    * strongest action only: the log keeps one label per served item, so a repeated action
      (two clicks) counts once and a skipped step (a purchase without an add to cart) is
      folded as the whole ladder;
    * only what the log holds: interactions outside a search (no query id), with items not
      on the served page, or after the feedback window closed; impressions the frontend did
      not send (the log assumes every served item was shown: the search page does not send
      impressions, so its shoppers' worker affinities lack the 0.05s); searches with an empty
      page (no rows: no query in ``recent_queries``, no session count);
    * order: a search's actions are folded right after its impressions; an action that came
      after the shopper's next search (two searches open at once) is folded earlier than the
      worker saw it;
    * categories: offline from the catalog; online from the catalog events the worker has
      consumed (an interaction with an item whose catalog event comes later adds its affinity
      when it comes, decayed from the interaction's time: ``streams.behaviour``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from tailbridge.vocab import normalize_query

MAX_RECENT_ITEMS = 50
MAX_RECENT_QUERIES = 10
MAX_SESSIONS = 3
# Per user and source: how far out of order (in events) a new event may come and still be
# applied; an older one is taken for a redelivery and skipped. Bounds the state's size.
MAX_SEEN_IDS = 64
STATE_VERSION = 2  # the layout of a state; ``restore`` starts over from another
AFFINITY_HALF_LIFE_S = 3 * 24 * 3600.0
MIN_AFFINITY = 1e-3
ACTION_WEIGHT = {"impression": 0.05, "click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
# A feedback label -> the actions it stands for, in the order they happen.
LABEL_ACTIONS = {"shown_unclicked": (), "clicked": ("click",), "added_to_cart": ("click", "add_to_cart"),
                 "purchased": ("click", "add_to_cart", "purchase")}
SESSION_COUNTER = {"click": "clicks", "add_to_cart": "carts", "purchase": "purchases"}

UserState = dict[str, Any]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class Searched(Protocol):
    """A served search (``streams.events.QueryEvent`` is one)."""

    type: Literal["query"]
    event_id: str
    event_time: datetime
    session_id: str
    query: str


class Acted(Protocol):
    """An impression, click, add to cart or purchase (``streams.events.InteractionEvent`` is one)."""

    type: Literal["interaction"]
    event_id: str
    event_time: datetime
    session_id: str
    item_id: str
    action: str


def epoch_ms(when: datetime) -> int:
    """Integer epoch milliseconds (floored), the same for a datetime and a pandas Timestamp."""
    return (when - _EPOCH) // _MS


def new_state() -> UserState:
    return {"version": STATE_VERSION, "seen": {}, "items": [], "queries": [], "affinity": {}, "affinity_ms": 0,
            "sessions": {}}


def restore(state: UserState | None) -> UserState:
    """A state read back from storage, or a new one if there is none or it has an older layout
    (a worker must not fail on what an earlier version wrote; the context rebuilds as events come)."""
    return state if state and state.get("version") == STATE_VERSION else new_state()


def _claim(state: UserState, source: str, event_ms: int, event_id: str) -> bool:
    """Record the event as applied; False if it was applied already or is too old to tell."""
    seen = state["seen"].setdefault(source, {"ids": [], "forgot": None})
    key = [event_ms, event_id]
    if (seen["forgot"] is not None and key <= seen["forgot"]) or any(i == event_id for _, i in seen["ids"]):
        return False
    bisect.insort(seen["ids"], key)
    if len(seen["ids"]) > MAX_SEEN_IDS:
        seen["forgot"] = seen["ids"].pop(0)
    return True


def _insert_by_time(entries: list[list], entry: list, event_ms: int, cap: int) -> None:
    """Insert into a newest-first list of entries whose last element is their time, before
    those of the same time (what prepending does when events come in order); keep ``cap``."""
    at = next((k for k, old in enumerate(entries) if old[-1] <= event_ms), len(entries))
    entries.insert(at, entry)
    del entries[cap:]


def _count(state: UserState, session_id: str, event_ms: int, counter: str) -> None:
    sessions = state["sessions"]
    session = sessions.setdefault(session_id, {"last_ms": event_ms, "queries": 0, "clicks": 0, "carts": 0, "purchases": 0})
    session["last_ms"] = max(session["last_ms"], event_ms)
    if counter:
        session[counter] += 1
    if len(sessions) > MAX_SESSIONS:
        for stale in sorted(sessions, key=lambda s: (sessions[s]["last_ms"], s))[:-MAX_SESSIONS]:
            del sessions[stale]


def _decay_affinity(state: UserState, now_ms: int) -> None:
    elapsed_s = max(0, now_ms - state["affinity_ms"]) / 1000 if state["affinity_ms"] else 0.0
    if elapsed_s > 0:  # no time passed: nothing decays, nothing new falls below MIN_AFFINITY
        factor = math.pow(0.5, elapsed_s / AFFINITY_HALF_LIFE_S)
        state["affinity"] = {c: v * factor for c, v in state["affinity"].items() if v * factor >= MIN_AFFINITY}
    state["affinity_ms"] = max(state["affinity_ms"], now_ms)


def add_affinity(state: UserState, category: str, action: str, event_ms: int) -> None:
    """Add one action's weight to its category. The affinities are kept as of the latest event
    time (``affinity_ms``): a newer event first decays them to its time, an older one (late, or
    added once its item's category became known) adds its weight decayed to that time, so the
    sum is the same in whatever order the events come."""
    _decay_affinity(state, event_ms)
    factor = math.pow(0.5, (state["affinity_ms"] - event_ms) / 1000 / AFFINITY_HALF_LIFE_S)
    state["affinity"][category] = state["affinity"].get(category, 0.0) + ACTION_WEIGHT[action] * factor


def apply(state: UserState, event: Searched | Acted, category: str | None = None) -> bool:
    """Fold one event into the state; returns False (state unchanged) for a duplicate or an
    event too old to tell (see the module docstring). ``category`` is the interacted item's
    category, for affinities (None if unknown)."""
    event_ms = epoch_ms(event.event_time)
    if event.type == "query":
        if not _claim(state, "queries", event_ms, event.event_id):
            return False
        query = normalize_query(event.query)
        queries = state["queries"]  # [query, latest time], newest first, each query once
        kept = next((k for k, (q, _) in enumerate(queries) if q == query), None)
        if kept is None or queries[kept][1] <= event_ms:  # an older repeat changes nothing
            if kept is not None:
                del queries[kept]
            _insert_by_time(queries, [query, event_ms], event_ms, MAX_RECENT_QUERIES)
        _count(state, event.session_id, event_ms, "queries")
        return True

    if not _claim(state, "interactions", event_ms, event.event_id):
        return False
    if event.action != "impression":  # impressions are too many to be "recent items"
        _insert_by_time(state["items"], [event.item_id, event.action, event_ms], event_ms, MAX_RECENT_ITEMS)
    if category:
        add_affinity(state, category, event.action, event_ms)
    _count(state, event.session_id, event_ms, SESSION_COUNTER.get(event.action, ""))
    return True


def feature_row(user_id: str, state: UserState) -> dict[str, Any]:
    """The Feast ``user_context`` row (without the event timestamp): what the worker writes and
    what training rebuilds."""
    sessions = state["sessions"]
    current = max(sessions, key=lambda s: (sessions[s]["last_ms"], s)) if sessions else ""
    counts = sessions.get(current, {})
    total = sum(state["affinity"].values()) or 1.0
    affinity = sorted(state["affinity"].items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "user_id": user_id,
        "recent_item_ids": [item for item, _, _ in state["items"]],
        "recent_actions": [action for _, action, _ in state["items"]],
        "recent_action_times_ms": [ms for _, _, ms in state["items"]],
        "affinity_categories": [category for category, _ in affinity],
        "affinity_weights": [weight / total for _, weight in affinity],
        "recent_queries": [query for query, _ in state["queries"]],
        "session_id": current,
        "session_queries": counts.get("queries", 0),
        "session_clicks": counts.get("clicks", 0),
        "session_carts": counts.get("carts", 0),
        "session_purchases": counts.get("purchases", 0),
    }


def as_context(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``user_context`` row as the models take it (``user_id`` dropped), or None for a shopper
    with nothing to personalise on (no recent item, no affinity): the query handler's rule."""
    if not row.get("recent_item_ids") and not row.get("affinity_categories"):
        return None
    return {name: value for name, value in row.items() if name != "user_id"}


# --------------------------------------------------------------------------------------------
# The feedback log as events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedEvent:
    """A query (``Searched``) or an interaction (``Acted``) that a feedback log row records."""

    type: Literal["query", "interaction"]
    event_id: str
    event_time: datetime
    session_id: str
    query: str = ""
    item_id: str = ""
    action: str = ""


@dataclass(frozen=True)
class LoggedSearch:
    """One logged search: its rows (item, label) in page order."""

    query_id: str
    query: str
    user_id: str
    session_id: str
    event_time: datetime
    items: tuple[tuple[str, str], ...]


def logged_searches(frame) -> Iterator[LoggedSearch]:
    """The searches of a feedback log frame in ``models.data.feedback.read_feedback`` order
    (by time, then search, then position: one search's rows are contiguous and in page order)."""
    columns = ("query_id", "query", "user_id", "session_id", "item_id", "label")
    values = [frame[c].astype(str).tolist() for c in columns]
    times = list(frame["event_time"])
    rows = list(zip(*values, times))
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and rows[end][0] == rows[start][0]:
            end += 1
        qid, query, user, session, _, _, when = rows[start]
        when = when.to_pydatetime() if hasattr(when, "to_pydatetime") else when
        yield LoggedSearch(qid, query, user, session, when, tuple((r[4], r[5]) for r in rows[start:end]))
        start = end


def search_events(search: LoggedSearch) -> list[LoggedEvent]:
    """The events a logged search records (see the module docstring): its query, an impression
    per served item, then each item's actions in page order, all at the search's time."""
    def action(item: str, name: str) -> LoggedEvent:
        return LoggedEvent("interaction", f"{search.query_id}|{item}|{name}", search.event_time, search.session_id,
                           item_id=item, action=name)

    return [LoggedEvent("query", search.query_id, search.event_time, search.session_id, query=search.query),
            *(action(item, "impression") for item, _ in search.items),
            *(action(item, name) for item, label in search.items for name in LABEL_ACTIONS[label])]


def fold_search(state: UserState, search: LoggedSearch, item_category: Mapping[str, str]) -> None:
    for event in search_events(search):
        apply(state, event, item_category.get(event.item_id) if event.type == "interaction" else None)


def fold_log(searches: Iterable[LoggedSearch], item_category: Mapping[str, str]) -> dict[str, UserState]:
    """Every user's state after the given logged searches (in time order)."""
    states: dict[str, UserState] = {}
    for search in searches:
        fold_search(states.setdefault(search.user_id, new_state()), search, item_category)
    return states
