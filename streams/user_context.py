"""Per-user real-time context, folded event by event from query and interaction events.

The state is a plain dict (stored as JSON in Redis by the worker), so it survives restarts
without faust table recovery. Folding is idempotent: each source topic keeps a watermark
(the latest event time applied and the ids applied at exactly that time), and an event at or
below it is a duplicate or late and is skipped. Queries and interactions come from two topics
whose relative order is arbitrary, so nothing here depends on how the two interleave: item
history and affinities come from interactions only, recent queries from queries only, and
session counters are counts per session.
"""

from __future__ import annotations

import math
from typing import Any

from tailbridge.streams.events import InteractionEvent, QueryEvent
from tailbridge.vocab import normalize_query

MAX_RECENT_ITEMS = 50
MAX_RECENT_QUERIES = 10
MAX_SESSIONS = 3
AFFINITY_HALF_LIFE_S = 3 * 24 * 3600.0
MIN_AFFINITY = 1e-3
ACTION_WEIGHT = {"impression": 0.05, "click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}

UserState = dict[str, Any]


def new_state() -> UserState:
    return {"watermarks": {}, "items": [], "queries": [], "affinity": {}, "affinity_ms": 0, "sessions": {}}


def _epoch_ms(event: QueryEvent | InteractionEvent) -> int:
    return int(event.event_time.timestamp() * 1000)


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
    for stale in sorted(sessions, key=lambda s: (sessions[s]["last_ms"], s))[:-MAX_SESSIONS]:
        del sessions[stale]


def apply(state: UserState, event: QueryEvent | InteractionEvent, category: str | None = None) -> bool:
    """Fold one event into the state; returns False (state unchanged) for a duplicate.
    ``category`` is the interacted item's category, for affinities (None if unknown)."""
    event_ms = _epoch_ms(event)
    if isinstance(event, QueryEvent):
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
    counter = {"click": "clicks", "add_to_cart": "carts", "purchase": "purchases"}.get(event.action, "")
    _count(state, event.session_id, event_ms, counter)
    return True


def _decay_affinity(state: UserState, now_ms: int) -> None:
    elapsed_s = max(0, now_ms - state["affinity_ms"]) / 1000 if state["affinity_ms"] else 0.0
    factor = math.pow(0.5, elapsed_s / AFFINITY_HALF_LIFE_S)
    state["affinity"] = {c: v * factor for c, v in state["affinity"].items() if v * factor >= MIN_AFFINITY}
    state["affinity_ms"] = max(state["affinity_ms"], now_ms)


def feature_row(user_id: str, state: UserState) -> dict[str, Any]:
    """The Feast `user_context` row (without the event timestamp)."""
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
