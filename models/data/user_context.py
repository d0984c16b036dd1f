"""The shopper's context: ONE fold, used online by the stream worker and offline by training.

The stream worker (``streams.behaviour``) folds every query and interaction event into a
per-user state and writes ``feature_row(state)`` to the Feast ``user_context`` view. The
trainers rebuild the context a shopper had at each logged search by folding the feedback log
with the same functions (``fold_search`` over ``logged_searches``), so a model trains on the
features it is served: same decay, same impression weighting, same caps, same row.

Folding
    The state is a plain dict (JSON in Redis online), so it survives worker restarts. Folding
    is idempotent: each source ("queries", "interactions") keeps a watermark (the latest event
    time applied and the ids applied at exactly that time); an event at or below it is a
    duplicate or late and is skipped. Queries and interactions come from two topics whose
    relative order is arbitrary, so nothing depends on how they interleave: recent items and
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
    * categories: offline from the catalog; online from the index at the time (an interaction
      with an item not yet indexed adds no affinity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from tailbridge.vocab import normalize_query

MAX_RECENT_ITEMS = 50
MAX_RECENT_QUERIES = 10
MAX_SESSIONS = 3
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
    return {"watermarks": {}, "items": [], "queries": [], "affinity": {}, "affinity_ms": 0, "sessions": {}}


def _claim(state: UserState, source: str, event_ms: int, event_id: str) -> bool:
    """Advance the source's watermark past this event; False if it was already applied (or is late)."""
    mark_ms, mark_ids = state["watermarks"].get(source, (-1, []))
    if event_ms < mark_ms or (event_ms == mark_ms and event_id in mark_ids):
        return False
    state["watermarks"][source] = (event_ms, [*mark_ids, event_id] if event_ms == mark_ms else [event_id])
    return True


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


def apply(state: UserState, event: Searched | Acted, category: str | None = None) -> bool:
    """Fold one event into the state; returns False (state unchanged) for a duplicate or a late
    event. ``category`` is the interacted item's category, for affinities (None if unknown)."""
    event_ms = epoch_ms(event.event_time)
    if event.type == "query":
        if not _claim(state, "queries", event_ms, event.event_id):
            return False
        query = normalize_query(event.query)
        state["queries"] = [query, *(q for q in state["queries"] if q != query)][:MAX_RECENT_QUERIES]
        _count(state, event.session_id, event_ms, "queries")
        return True

    if not _claim(state, "interactions", event_ms, event.event_id):
        return False
    if event.action != "impression":  # impressions are too many to be "recent items"
        state["items"] = [[event.item_id, event.action, event_ms], *state["items"]][:MAX_RECENT_ITEMS]
    if category:
        _decay_affinity(state, event_ms)
        affinity = state["affinity"]
        affinity[category] = affinity.get(category, 0.0) + ACTION_WEIGHT[event.action]
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
        "recent_queries": list(state["queries"]),
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
