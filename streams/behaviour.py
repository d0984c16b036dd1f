"""The behaviour processor: query and interaction events into user context, item counters and
the feedback log. Plain synchronous code; ``processor`` is how the worker (``streams.app``)
runs it: batches of the queries and interactions topics, and periodic jobs.

One batch is applied in one Redis transaction (WATCH on the users' state keys, then MULTI):
the new user states, the item counter increments and the open feedback queries land together
or not at all, and with them the users' Feast ``user_context`` rows, written straight into
Feast's Redis layout (``feature_repo.redis_rows``) with strictly increasing timestamps per
user. The writes go as one script call (``streams.redis_writes``). Duplicates are recognised
by the event ids the user-context fold keeps (``models.data.user_context``: the one fold,
which training runs over the feedback log too), so redelivery after a crash, or a replay of
the same events, changes nothing.

Feedback windows are in event time: a search's actions count if they are no later than the
search's time plus ``feedback_window_seconds``, and the search is written to the log once the
worker's event-time clock (``streams.event_time``) has passed that, so the log is the same
whether the worker kept up or read a backlog.

An interaction with an item whose category is not known yet (its catalog event not consumed
yet) is kept per item as pending; once the category is known, ``resolve_categories`` adds the
affinity the fold would have added, decayed from the interaction's time.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import orjson
import redis
from feast import FeatureStore

from tailbridge.feature_repo.redis_rows import RedisRows
from tailbridge.models.data import user_context
from tailbridge.streams import feedback, item_stats, rewrite_feedback
from tailbridge.streams.redis_writes import Applier, Writes
from tailbridge.streams.event_time import EventClock
from tailbridge.streams.events import InteractionEvent, QueryEvent
from tailbridge.streams.processor import Counts, Periodic, Processor, Resources
from tailbridge.settings import Settings

FEEDBACK_LEASE_MS = 60_000
# Events per batch at least (when that many wait): the per-batch and per-user work (Redis round
# trips, each user's state and Feast row) is shared by more events than at worker_batch_size's
# 500: in-process CPU per event 57 -> 47 µs, redis-server's 20 -> 10 µs (bench/streams.py stages).
BATCH_EVENTS = 2000


def batch_events(settings: Settings) -> int:
    """The most events the worker hands the behaviour processor at once."""
    return max(BATCH_EVENTS, settings.worker_batch_size)

# Claim the feedback queries whose window closed by the event-time clock (ARGV[1]), and ones
# whose earlier claim expired by the wall clock (ARGV[2]), for LEASE ms.
_CLAIM = """
local clock, now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', clock, 'LIMIT', 0, limit)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  table.insert(ids, id)
end
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], now + lease, id)
end
return ids
"""


class Keys:
    """Every Redis key the stream processors own, namespaced by the Feast project."""

    def __init__(self, settings: Settings):
        self.root = f"tb:{settings.feast_project}"

    def user(self, user_id: str) -> str:
        return f"{self.root}:user:{user_id}"

    def counters(self, item_id: str) -> str:
        return f"{self.root}:item:{item_id}:counters"

    def feedback(self, query_id: str) -> str:
        return f"{self.root}:fb:{query_id}"

    def pending(self, item_id: str) -> str:
        """Interactions with the item that came before its category: [user, action, ms] each."""
        return f"{self.root}:item:{item_id}:pending"

    def event_clock(self, topic: str) -> str:
        return f"{self.root}:clock:{topic}"

    @property
    def item_category(self) -> str:
        return f"{self.root}:item_category"

    @property
    def pending_items(self) -> str:
        return f"{self.root}:items:pending"

    @property
    def dirty_items(self) -> str:
        return f"{self.root}:items:dirty"

    @property
    def feedback_open(self) -> str:
        return f"{self.root}:fb:open"

    @property
    def feedback_flushing(self) -> str:
        return f"{self.root}:fb:flushing"

    @property
    def applied(self) -> str:
        """Count of events applied: lets operators, tests and benchmarks see progress."""
        return f"{self.root}:applied"

    @property
    def duplicates(self) -> str:
        """Count of events skipped as already applied (redelivered or replayed)."""
        return f"{self.root}:duplicates"


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    users_written: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class BehaviourProcessor:
    def __init__(self, settings: Settings, redis_client: redis.Redis, store: FeatureStore):
        self.settings = settings
        self.redis = redis_client
        self.store = store
        self.keys = Keys(settings)
        self._writes = Applier(redis_client)
        self._claim = redis_client.register_script(_CLAIM)
        self.rewrite_feedback = rewrite_feedback.Emitter(settings)  # feedback of the rewrites closed searches used
        self.user_ttl_s = settings.redis_key_ttl_seconds or None
        self.feedback_ttl_s = int(settings.feedback_window_seconds * 4) + 3600
        self.window_ms = int(settings.feedback_window_seconds * 1000)
        # Only interactions decide labels: a search consumed late is written with what its hash holds.
        self.clock = EventClock(redis_client, self.keys.event_clock("interactions"), "interactions",
                                settings.topic_partitions, settings.worker_idle_seconds)

    @cached_property
    def user_rows(self) -> RedisRows:  # on first use: a worker starts before the views are registered
        return RedisRows(self.store, "user_context")

    @cached_property
    def item_rows(self) -> RedisRows:
        return RedisRows(self.store, "item_stats")

    # ------------------------------------------------------------------ events

    def process(self, events: Sequence[QueryEvent | InteractionEvent]) -> BatchResult:
        timings = Counter()  # seconds per stage, added up over WATCH retries
        clock = time.perf_counter
        started = clock()
        result = BatchResult(timings=timings)
        users = sorted({event.user_id for event in events})
        user_keys = [self.keys.user(user) for user in users]
        items = sorted({e.item_id for e in events if isinstance(e, InteractionEvent)})
        categories = dict(zip(items, self.redis.hmget(self.keys.item_category, items))) if items else {}
        timings["read_s"] += clock() - started

        while True:
            with self.redis.pipeline() as pipe:
                try:
                    t = clock()
                    pipe.watch(*user_keys)
                    states = self._states(pipe, users)
                    timings["read_s"] += clock() - t
                    t = clock()
                    counters, opened, actions, pending, result.applied, result.duplicates = self._fold(
                        events, states, categories)
                    timings["fold_s"] += clock() - t
                    t = clock()
                    writes = Writes()
                    self._stage_writes(writes, states, counters, opened, actions, pending, result)
                    timings["stage_s"] += clock() - t
                    t = clock()
                    pipe.multi()
                    self._writes.stage(pipe, writes)
                    pipe.execute()
                    timings["write_s"] += clock() - t
                    break
                except redis.WatchError:  # another worker touched one of these users: fold again
                    timings["write_s"] += clock() - t
                    continue
        # Every user of the batch gets its state and Feast row rewritten, changed or not: harmless,
        # and the row's timestamp (written_ms) moves with its state's.
        result.users_written = len(users)
        timings["total_s"] = clock() - started
        return result

    def _states(self, pipe, users) -> dict[str, user_context.UserState]:
        raw_states = pipe.mget([self.keys.user(user) for user in users])
        return {u: user_context.restore(orjson.loads(raw) if raw else None) for u, raw in zip(users, raw_states)}

    def _fold(self, events, states, categories):
        counters: dict[str, Counter] = defaultdict(Counter)
        last_ms: dict[str, int] = {}
        opened: list[QueryEvent] = []
        actions: list[InteractionEvent] = []
        pending: list[InteractionEvent] = []  # applied without the item's category: not known yet
        applied = duplicates = 0
        for event in events:
            category = categories.get(event.item_id) if isinstance(event, InteractionEvent) else None
            if not user_context.apply(states[event.user_id], event, category.decode() if category else None):
                duplicates += 1
                continue
            applied += 1
            if isinstance(event, QueryEvent):
                opened.append(event)
                continue
            event_ms = int(event.event_time.timestamp() * 1000)
            counters[event.item_id].update(item_stats.bucket_fields(event.action, event_ms))
            last_ms[event.item_id] = max(last_ms.get(event.item_id, 0), event_ms)
            if event.query_id and event.action in feedback.LABEL_OF_ACTION:
                actions.append(event)
            if not category:
                pending.append(event)
        return (counters, last_ms), opened, actions, pending, applied, duplicates

    def _stage_states(self, writes: Writes, states) -> None:
        """Each user's state and its Feast row, with a timestamp newer than the last one written."""
        now_ms = int(time.time() * 1000)
        rows = self.user_rows
        for user, state in states.items():  # written_ms moves for every user: see process()
            state["written_ms"] = max(now_ms, state.get("written_ms", 0) + 1)
            writes.set(self.keys.user(user), orjson.dumps(state), self.user_ttl_s)
            writes.hset(rows.key(user), rows.fields(user_context.feature_row(user, state), state["written_ms"]),
                        rows.ttl_s)

    def _stage_writes(self, writes: Writes, states, counters, opened, actions, pending, result: BatchResult) -> None:
        self._stage_states(writes, states)
        increments, last_ms = counters
        for item, fields in increments.items():
            key = self.keys.counters(item)
            writes.hincrby(key, fields)
            writes.keep(key, item_stats.LAST_EVENT_FIELD, last_ms[item], "max")
            writes.expire(key, item_stats.COUNTER_TTL_S)
        if increments:
            writes.sadd(self.keys.dirty_items, increments)
        for query in opened:  # closes when the event-time clock passes the search's time + window
            key = self.keys.feedback(query.query_id)
            writes.hset(key, {feedback.QUERY_FIELD: orjson.dumps(query.model_dump(mode="json"))}, self.feedback_ttl_s)
            writes.zadd_nx(self.keys.feedback_open, query.query_id,
                           user_context.epoch_ms(query.event_time) + self.window_ms)
        for event in actions:  # each action's earliest time: the label counts it if inside the window
            key = self.keys.feedback(event.query_id)
            writes.keep(key, feedback.action_field(event.item_id, event.action), user_context.epoch_ms(event.event_time),
                        "min")
            writes.expire(key, self.feedback_ttl_s)
        for event in pending:
            writes.rpush(self.keys.pending(event.item_id),
                         orjson.dumps([event.user_id, event.action, user_context.epoch_ms(event.event_time)]),
                         self.user_ttl_s or self.feedback_ttl_s)
        if pending:
            writes.sadd(self.keys.pending_items, {event.item_id for event in pending})
        writes.incrby(self.keys.applied, result.applied)
        writes.incrby(self.keys.duplicates, result.duplicates)

    def resolve_categories(self, limit: int = 200) -> int:
        """Add the affinities of pending interactions (see the module docstring) whose item's
        category is known now, in one transaction with their users' states; returns how many."""
        items = sorted(i.decode() for i in self.redis.srandmember(self.keys.pending_items, limit))
        categories = dict(zip(items, self.redis.hmget(self.keys.item_category, items))) if items else {}
        known = [item for item in items if categories[item]]
        unknown = [item for item in items if not categories[item]]
        if unknown:  # forget items whose interactions expired before their category came
            with self.redis.pipeline(transaction=False) as pipe:
                for item in unknown:
                    pipe.exists(self.keys.pending(item))
                gone = [item for item, exists in zip(unknown, pipe.execute()) if not exists]
            if gone:
                self.redis.srem(self.keys.pending_items, *gone)
        if not known:
            return 0
        pending_keys = [self.keys.pending(item) for item in known]
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(*pending_keys)
                    entries = [(categories[item].decode(), orjson.loads(raw))
                               for item, key in zip(known, pending_keys) for raw in pipe.lrange(key, 0, -1)]
                    users = sorted({user for _, (user, _, _) in entries})
                    if users:
                        pipe.watch(*(self.keys.user(user) for user in users))
                    states = self._states(pipe, users) if users else {}
                    for category, (user, action, event_ms) in entries:
                        user_context.add_affinity(states[user], category, action, event_ms)
                    writes = Writes()
                    self._stage_states(writes, states)
                    pipe.multi()
                    self._writes.stage(pipe, writes)
                    pipe.delete(*pending_keys)
                    pipe.srem(self.keys.pending_items, *known)
                    pipe.execute()
                    break
                except redis.WatchError:  # a batch or another worker touched them: again
                    continue
        return len(entries)

    # ------------------------------------------------------------------ periodic flushes

    def flush_item_stats(self, limit: int = 1000) -> int:
        """Write the windowed stats of items whose counters changed to the Feast ``item_stats``
        view, where search reads them (never into Milvus rows: see ``streams.item_index``)."""
        items = [i.decode() for i in self.redis.spop(self.keys.dirty_items, limit) or []]
        if not items:
            return 0
        try:
            return self._write_item_stats(items)
        except Exception:
            self.redis.sadd(self.keys.dirty_items, *items)  # still dirty: the retry picks them up
            raise

    def _write_item_stats(self, items: list[str]) -> int:
        with self.redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.hgetall(self.keys.counters(item))
            raw = pipe.execute()
        rows, stale = [], {}
        for item, counters in zip(items, raw):
            counters = {k.decode(): v for k, v in counters.items()}
            if not counters:
                continue
            rows.append(item_stats.feature_row(item, counters))
            stale[item] = item_stats.stale_fields(counters, int(counters.get(item_stats.LAST_EVENT_FIELD, 0)))
        if not rows:
            return 0
        # The flush time as the rows' timestamp. Unlike write_to_online_store this does not skip a
        # row older than the stored one: an item flushed by two workers at once (dirty again and
        # popped by the other within this call) may keep the older counts until its next flush.
        now_ms = int(time.time() * 1000)
        writes = Writes()
        for row in rows:
            writes.hset(self.item_rows.key(row["item_id"]), self.item_rows.fields(row, now_ms), self.item_rows.ttl_s)
        with self.redis.pipeline(transaction=False) as pipe:
            self._writes.stage(pipe, writes)
            for item, fields in stale.items():
                if fields:
                    pipe.hdel(self.keys.counters(item), *fields)
            pipe.execute()
        return len(rows)

    def flush_feedback(self, limit: int = 500) -> tuple[int, int]:
        """Append the queries whose feedback window closed (by the event-time clock) to the log."""
        clock_ms = self.clock.now_ms()
        if clock_ms is None:
            return 0, 0
        claimed = [q.decode() for q in self._claim(keys=[self.keys.feedback_open, self.keys.feedback_flushing],
                                                    args=[clock_ms, int(time.time() * 1000), FEEDBACK_LEASE_MS, limit])]
        if not claimed:
            return 0, 0
        with self.redis.pipeline(transaction=False) as pipe:
            for query_id in claimed:
                pipe.hgetall(self.keys.feedback(query_id))
            hashes = pipe.execute()
        closed = [{k.decode(): v for k, v in h.items()} for h in hashes if h]
        written = feedback.append(feedback_dir(self.settings), [h for h in closed if feedback.QUERY_FIELD in h],
                                  window_s=self.settings.feedback_window_seconds)
        self.rewrite_feedback.emit(closed)  # also before forgetting them: a crash re-emits (deduplicated)
        with self.redis.pipeline(transaction=False) as pipe:  # only now forget them: a crash re-flushes
            pipe.zrem(self.keys.feedback_flushing, *claimed)
            pipe.delete(*(self.keys.feedback(q) for q in claimed))
            pipe.execute()
        return written


def feedback_dir(settings: Settings):
    return settings.data_dir / "offline" / "feedback"


def processor(resources: Resources) -> Processor:
    """Queries and interactions are both keyed by user, so one consumer sees all of a user's
    events; user states, item counters and open feedback queries share one transaction per batch.
    Read by the batch path (``streams.batch_consumer``): these are the high-rate topics."""
    behaviour = BehaviourProcessor(resources.settings, resources.redis, resources.store)

    def apply(events) -> Counts:
        result = behaviour.process(events)
        return {"applied": result.applied, "duplicates": result.duplicates}

    def flush_item_stats() -> Counts:
        return {"item_stats_written": behaviour.flush_item_stats()}

    def flush_feedback() -> Counts:
        return {"feedback_rows": behaviour.flush_feedback()[0]}

    def resolve_categories() -> Counts:
        return {"pending_affinities_added": behaviour.resolve_categories()}

    every = resources.settings.worker_flush_seconds
    return Processor("behaviour", ("queries", "interactions"), apply, fetch="batch",
                     batch_size=batch_events(resources.settings),
                     periodic=(Periodic("item_stats_flush", every, flush_item_stats),
                               Periodic("feedback_flush", every, flush_feedback),
                               Periodic("category_resolve", every, resolve_categories)),
                     clock=behaviour.clock)
