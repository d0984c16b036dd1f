"""The Feast ``query_stats`` view (searches, clicks and purchases of a query over 24 h, smoothed
CTR), written by the monitor: it already maps every search to its query.

Counters live in one Redis hash per query key with an hour bucket per field (any monitor
instance may count a query: queries are not partitioned, users are); a flush writes the Feast
row of each query touched since the last flush, windows ending at the query's latest event.
"""

from __future__ import annotations

import time
from collections import Counter

from tailbridge.feature_repo.redis_rows import RedisRows

from tailbridge.settings import Settings
from tailbridge.vocab import PRIOR_CTR, PRIOR_CTR_WEIGHT

HOUR_MS, HOURS = 3_600_000, 24
ACTIONS = {"search": "searches", "click": "clicks", "purchase": "purchases"}
LAST = "last_ms"
TTL_S = 26 * 3600


def feature_row(query_key: str, counters: dict) -> dict:
    """The Feast row of one query from its counter hash (str fields and values)."""
    now_h = int(counters.get(LAST, 0)) // HOUR_MS
    totals = {f"{name}_24h": 0 for name in ACTIONS.values()}
    for field, count in counters.items():
        if field == LAST:
            continue
        name, hour = field.split(":")
        if now_h - HOURS < int(hour) <= now_h:
            totals[f"{name}_24h"] += int(count)
    ctr = (totals["clicks_24h"] + PRIOR_CTR * PRIOR_CTR_WEIGHT) / (totals["searches_24h"] + PRIOR_CTR_WEIGHT)
    return {"query_key": query_key, **totals, "ctr_24h": ctr}


class QueryStats:
    def __init__(self, settings: Settings, redis, store):
        self.redis, self.prefix = redis, f"tb:{settings.feast_project}:qstats:"
        self.rows = RedisRows(store, "query_stats")
        self.pending: Counter = Counter()  # (query key, field) -> increment
        self.latest: dict[str, int] = {}  # query key -> latest event ms
        self.last_written_ms = 0

    def count(self, query_key: str, action: str, event_ms: int) -> None:
        self.pending[(query_key, f"{ACTIONS[action]}:{event_ms // HOUR_MS}")] += 1
        self.latest[query_key] = max(self.latest.get(query_key, 0), event_ms)

    def flush(self) -> dict[str, int]:
        """Apply the counts and write the touched queries' Feast rows (one round trip each way)."""
        if not self.latest:
            return {}
        pending, latest = self.pending, self.latest
        self.pending, self.latest = Counter(), {}
        pipe = self.redis.pipeline(transaction=True)  # all or nothing: a failed flush is retried whole
        for (key, field), n in pending.items():
            pipe.hincrby(self.prefix + key, field, n)
        for key, ms in latest.items():
            pipe.hset(self.prefix + key, LAST, ms)
            pipe.expire(self.prefix + key, TTL_S)
            pipe.hgetall(self.prefix + key)
        try:
            counters = pipe.execute()[len(pending) + 2::3]
        except Exception:
            self.pending.update(pending)  # kept for the next try (the worker retries this job)
            for key, ms in latest.items():
                self.latest[key] = max(self.latest.get(key, 0), ms)
            raise
        # Feast keeps a row only if its timestamp is newer than the stored one: strictly increasing.
        stamp = self.last_written_ms = max(int(time.time() * 1000), self.last_written_ms + 1)
        pipe = self.redis.pipeline(transaction=False)
        for key, hash_ in zip(latest, counters):
            row = feature_row(key, {f.decode(): v.decode() for f, v in hash_.items()})
            redis_key = self.rows.key(key)
            pipe.hset(redis_key, mapping=self.rows.fields(row, stamp))
            if self.rows.ttl_s:
                pipe.expire(redis_key, self.rows.ttl_s)
        pipe.execute()
        return {"query_stats_rows": len(latest)}
