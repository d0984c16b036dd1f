"""The Feast feature rows the drift monitor watches: which features, their defaults, which
entities it samples and how it reads their rows.

The monitor does not see feature values in the events: it samples, per bucket of stream time,
at most ``per_bucket`` of the users and of the items the stream names (the first ones of the
bucket, so the sample is bounded whatever the rate) and reads their ``user_context`` and
``item_stats`` rows straight from Redis in Feast's layout (``feature_repo.redis_rows.RowReader``,
as search reads them), in one pipelined round trip per batch. Each row becomes a
``core.FeatureObservation`` in the bucket of the event that named the entity; its freshness lag
is the read's (wall-clock) time minus the row's timestamp, as a row's age when search reads it.
A field that does not decode is passed on as its raw bytes and a timestamp that does not decode
as a NaN lag: the monitor counts both and carries on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from tailbridge.feature_repo.definitions import item_stats as item_stats_view
from tailbridge.feature_repo.definitions import user_context as user_context_view
from tailbridge.feature_repo.redis_rows import RedisRows, RowReader
from tailbridge.models.data import user_context
from tailbridge.streams import item_stats
from tailbridge.streams.events import InteractionEvent, QueryEvent
from tailbridge.streams.monitor.core import FeatureObservation


def _defaults(row: dict[str, Any], view) -> dict[str, Any]:
    return {field.name: row[field.name] for field in view.features}


# view -> feature -> what its writer puts when it knows nothing: the row of a user with no
# events yet, of an item nobody engaged with (counts 0, rates at their priors)
FEATURES: dict[str, dict[str, Any]] = {
    "user_context": _defaults(user_context.feature_row("", user_context.new_state()), user_context_view),
    "item_stats": _defaults(item_stats.feature_row("", {}), item_stats_view),
}
READ_COOLDOWN_S = 10.0  # after a failed read, the monitor goes on without feature rows this long
log = logging.getLogger("tailbridge.monitor")


class Sampler:
    """At most ``per_bucket`` distinct users and items per bucket of stream time, the first ones
    seen; only the newest buckets' picks are remembered (a late event's entity is not sampled)."""

    KEEP = 8  # buckets remembered

    def __init__(self, bucket_s: float, per_bucket: int):
        self.bucket_ms, self.per_bucket = int(bucket_s * 1000), per_bucket
        self.picked: dict[int, dict[str, set[str]]] = {}

    def pick(self, event) -> list[tuple[str, str]]:
        """(view, entity) pairs to read for this event."""
        if isinstance(event, QueryEvent):
            named = [("user_context", event.user_id)]
        elif isinstance(event, InteractionEvent):
            named = [("user_context", event.user_id), ("item_stats", event.item_id)]
        else:
            return []
        index = int(event.event_time.timestamp() * 1000) // self.bucket_ms
        bucket = self.picked.get(index)
        if bucket is None:
            if self.picked and index < min(self.picked):
                return []
            bucket = self.picked[index] = {"user_context": set(), "item_stats": set()}
            for old in sorted(self.picked)[:-self.KEEP]:
                del self.picked[old]
        out = []
        for view, entity in named:
            seen = bucket[view]
            if len(seen) < self.per_bucket and entity not in seen:
                seen.add(entity)
                out.append((view, entity))
        return out


class FeatureReader:
    """Rows of sampled entities, read in one pipeline per call (see the module docstring)."""

    def __init__(self, redis, store, clock: Callable[[], float] = time.time):
        self.redis, self.store, self.clock = redis, store, clock
        self.readers: dict[str, RowReader] | None = None  # on first use: the views may not be registered yet
        self.paused_until = 0.0

    def read(self, picks: list[tuple[str, str, Any]]) -> list[FeatureObservation] | None:
        """One observation per (view, entity, event_time) pick, in order; None when Redis failed
        (the monitor goes on without them for ``READ_COOLDOWN_S``: it never waits on a dependency)."""
        if not picks or time.monotonic() < self.paused_until:
            return None if picks else []
        try:
            if self.readers is None:
                self.store.refresh_registry()
                self.readers = {view: RowReader(RedisRows(self.store, view), list(names))
                                for view, names in FEATURES.items()}
            with self.redis.pipeline(transaction=False) as pipe:
                for view, entity, _ in picks:
                    reader = self.readers[view]
                    pipe.hmget(reader.rows.key(entity), reader.fields)
                rows = pipe.execute()
        except Exception as exc:  # noqa: BLE001  Redis down or slow, views not registered: no rows for a while
            log.warning("feature rows not readable (%s); retrying in %.0f s", exc, READ_COOLDOWN_S)
            self.paused_until = time.monotonic() + READ_COOLDOWN_S
            return None
        now_ms = self.clock() * 1000
        return [self._observation(view, event_time, values, now_ms) for (view, _, event_time), values in zip(picks, rows)]

    def _observation(self, view: str, event_time, values: list[bytes | None], now_ms: float) -> FeatureObservation:
        if not values[0]:
            return FeatureObservation(view, event_time, None)
        try:
            lag_s = (now_ms - RowReader.timestamp_ms(values[0])) / 1000
        except Exception:  # noqa: BLE001  not a timestamp: the monitor counts it
            lag_s = math.nan
        reader = self.readers[view]
        return FeatureObservation(view, event_time, {name: _value(raw) for name, raw in zip(reader.names, values[1:])},
                                  lag_s)


def _value(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return RowReader.value(raw)
    except Exception:  # noqa: BLE001  garbage in the field: passed on as bytes, which the monitor counts as bad
        return raw
