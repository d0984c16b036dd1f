"""POST /events (interactions from the frontend, validated, published to Kafka: 202) and
GET /users (shoppers that have a real-time context: the search page's user selector)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated

import redis
from fastapi import APIRouter, HTTPException, Query

from tailbridge.serving.dependencies import Components, ComponentsDep
from tailbridge.serving.schemas import EventAccepted, UserList
from tailbridge.streams.behaviour import Keys
from tailbridge.streams.event_time import seconds_ahead
from tailbridge.streams.events import InteractionEvent

USER_SCAN_KEYS = 200_000  # Redis keys looked at, at most, per /users call (a shared Redis holds many)

router = APIRouter()


@router.post("/events", status_code=202, response_model=EventAccepted,
             responses={503: {"description": "The event buffer is full (broker down for long)."}})
def events(body: InteractionEvent, deps: ComponentsDep) -> EventAccepted:
    # One event stamped far ahead would move the shopper's context to that time (streams.event_time).
    # Refused like a validation error, in the same shape.
    ahead_s = seconds_ahead(body.event_time, time.time())
    if ahead_s > deps.settings.max_event_skew_seconds:
        deps.metrics.events_rejected.labels("future_event_time").inc()
        raise HTTPException(422, [{"loc": ["body", "event_time"], "type": "future_event_time",
                                   "msg": f"{ahead_s:.0f} s ahead of the server's clock "
                                          f"(at most {deps.settings.max_event_skew_seconds:g} s allowed)"}])
    topic = deps.publisher.publish(body)
    if topic is None:
        raise HTTPException(503, "event buffer full: the broker is unreachable; retry later")
    return EventAccepted(event_id=body.event_id, topic=topic)


@router.get("/users", response_model=UserList)
async def users(deps: ComponentsDep, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> UserList:
    return await users_with_context(deps, limit)


async def users_with_context(deps: Components, limit: int) -> UserList:
    """Shoppers a search would personalise, for the page's selector and for benchmarks.

    Candidates are the users the stream workers keep state for (Redis keys
    ``tb:<project>:user:<id>``, SCANned, so no demo file has to be where the app runs); each is
    then read through the same Feast reader search uses and kept only when its context is not
    empty, so every id listed gets ``personalized: true`` right now. No Redis (the SQLite
    fallback has no workers), no context reader, or an unreachable Redis: an empty list, and
    ``source`` says why."""
    features = deps.service.features
    if features is None:
        return UserList(user_ids=[], source=f"no user-context reader: {deps.context_error}")
    if deps.user_states is None:
        return UserList(user_ids=[], source="no Redis online store (SQLite): no stream worker keeps user states")
    prefix = Keys(deps.settings).user("")
    try:
        candidates = await asyncio.to_thread(scan_users, deps.user_states, prefix, limit)
    except redis.RedisError as exc:
        return UserList(user_ids=[], source=f"Redis at {deps.redis_url} failed: {type(exc).__name__}: {exc}")
    found: list[str] = []
    try:
        for user_id in sorted(set(candidates)):  # Redis answered, so Feast's reads will not hang
            if await features.user_context(user_id) is not None:
                found.append(user_id)
                if len(found) == limit:
                    break
    except Exception as exc:  # noqa: BLE001  the selector falls back to anonymous; say why
        return UserList(user_ids=found, source=f"Feast user_context read failed: {type(exc).__name__}: {exc}")
    return UserList(user_ids=found, source=f"stream-worker user states in Redis ({len(set(candidates))} candidates), "
                                           "kept those whose Feast user_context is not empty")


def scan_users(r: redis.Redis, prefix: str, limit: int) -> list[str]:
    """User ids with a worker state key, SCANned until there are a few more than ``limit``."""
    # SCAN MATCH is a glob: escape the project name's glob characters.
    pattern = re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*"
    candidates: list[str] = []
    cursor, scanned = 0, 0
    while True:
        cursor, keys = r.scan(cursor, match=pattern, count=2000)
        scanned += 2000
        candidates += [key.decode(errors="replace")[len(prefix):] for key in keys]
        if cursor == 0 or len(candidates) >= 3 * limit or scanned >= USER_SCAN_KEYS:
            return candidates
