"""The shopper's real-time context and the candidates' behaviour stats, read from the Feast
``user_context`` and ``item_stats`` views the stream workers keep, and the rewrite store
(normalised query -> rewrites) that the rewriter fills ahead of time. All are optional for
search: the handler awaits them through ``serving.guard``.

With Redis as the online store (every deployment but the no-server fallback) the rows are read
straight from Feast's Redis layout (``feature_repo.redis_rows``: the same key and field names
the workers write and ``get_online_features`` reads) with one async Redis client: a read is
one HMGET (the candidates' stats one script call, one round trip), nothing blocks the event loop, and
50 concurrent searches are 50 in-flight commands on a connection pool instead of 50 calls
queued for a handful of threads. Measured under 50 concurrent reads on this 2-core machine
(``bench/serving.py`` context phase; numbers in bench/README.md): this path against
``get_online_features`` on threads and Feast's own ``get_online_features_async``.
Without Redis (Feast's SQLite store) the sync Feast reader runs on a small thread pool.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis

from tailbridge.feature_repo.definitions import user_context
from tailbridge.feature_repo.redis_rows import RedisRows, RowReader
from tailbridge.models.data.user_context import as_context
from tailbridge.settings import Settings
from tailbridge.streams import rewrite_store
from tailbridge.streams.item_stats import STATS_FIELDS
from tailbridge.vocab import NO_ITEM_STATS

# `features`, not `schema`: Feast's apply() adds the entity column (user_id) to the view's schema
# in place, so a process that applied the repo before importing this module would ask for
# "user_context:user_id" and every context read would fail.
USER_CONTEXT_FEATURES = [f"user_context:{field.name}" for field in user_context.features]
ITEM_STATS_FEATURES = [f"item_stats:{name}" for name in STATS_FIELDS]
REDIS_SOCKET_TIMEOUT_S = 1.0  # the search's own deadline (serve_context_timeout_ms) is far shorter
# The candidates' rows in one command: a pipeline of 50 HMGETs is packed, sent and parsed command
# by command by redis-py's asyncio client (1.2 ms of the handler's CPU per search, against 0.4 ms
# for this script, whose one nested reply hiredis parses). The same reads, and atomic.
HMGET_EACH = "local out = {} for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end return out"


class OnlineFeatures(Protocol):
    """What search reads from the online store."""

    async def user_context(self, user_id: str) -> dict[str, Any] | None: ...

    async def item_stats(self, item_ids: list[str]) -> dict[str, dict[str, float]]: ...

    async def close(self) -> None: ...


def _stats_or_priors(row: dict[str, Any] | None) -> dict[str, float]:
    """The row's stats, the prior for each one it lacks: no row, or a row written before a field
    existed (the 7-day conversion rates) until the worker writes the item again."""
    return {name: NO_ITEM_STATS[name] if not row or row.get(name) is None else row[name] for name in STATS_FIELDS}


class _Coalesced:
    """HMGETs of one field list issued in the same event-loop iteration go out as one pipeline:
    one connection and one round trip for a burst of concurrent searches. Each command on its
    own takes a connection of the pool, and opening dozens at once (several round trips each)
    made a burst of 50 cold reads take ~600 ms on a loaded machine (30-45 ms warm; one
    pipeline, a few ms). A caller that gave up (its deadline) is simply not answered."""

    def __init__(self, client: aioredis.Redis, fields: list[bytes]):
        self._redis, self._fields = client, fields
        self._waiting: list[tuple[bytes, asyncio.Future]] = []

    async def hmget(self, key: bytes) -> list[bytes | None]:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._waiting.append((key, answer))
        if len(self._waiting) == 1:
            loop.call_soon(self._send)
        return await answer

    def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        asyncio.ensure_future(self._pipeline(batch))

    async def _pipeline(self, batch: list[tuple[bytes, asyncio.Future]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, _ in batch:
                    pipe.hmget(key, self._fields)
                rows = await pipe.execute()
        except Exception as exc:  # every caller of the batch gets the error
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, answer), values in zip(batch, rows):
            if not answer.done():
                answer.set_result(values)


class RedisOnlineFeatures:
    """Feast rows read straight from Redis, asynchronously."""

    def __init__(self, settings: Settings, redis_url: str):
        from tailbridge.feature_repo.store import feature_store

        store = feature_store(settings)
        store.refresh_registry()
        self._users = RowReader(RedisRows(store, "user_context"), [f.name for f in user_context.features])
        self._items = RowReader(RedisRows(store, "item_stats"), list(STATS_FIELDS))
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                                              socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S)
        self._user_reads = _Coalesced(self._redis, self._users.fields)
        self._hmget_each = self._redis.register_script(HMGET_EACH)

    async def user_context(self, user_id: str) -> dict[str, Any] | None:
        row = self._users.decode(await self._user_reads.hmget(self._users.rows.key(user_id)))
        return as_context(row) if row else None

    async def item_stats(self, item_ids: list[str]) -> dict[str, dict[str, float]]:
        """Each item's ``STATS_FIELDS`` in one round trip (one script call); the priors
        (``NO_ITEM_STATS``) for an item without a row (nobody engaged with it in the view's TTL)."""
        if not item_ids:
            return {}
        rows = await self._hmget_each(keys=[self._items.rows.key(item) for item in item_ids], args=self._items.fields)
        return {item: _stats_or_priors(self._items.decode(values)) for item, values in zip(item_ids, rows)}

    async def close(self) -> None:
        await self._redis.aclose()


class FeastOnlineFeatures:
    """Feast's own sync reads on a small thread pool: the SQLite online store (no Redis).
    Feast is imported and the registry loaded once, here, not per request."""

    def __init__(self, settings: Settings, threads: int = 4):
        from tailbridge.feature_repo.store import feature_store

        self._store = feature_store(settings)
        self._store.refresh_registry()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="feast")

    def _user(self, user_id: str) -> dict[str, Any] | None:
        row = self._store.get_online_features(features=USER_CONTEXT_FEATURES, entity_rows=[{"user_id": user_id}]).to_dict()
        return as_context({name: values[0] for name, values in row.items()})

    def _stats(self, item_ids: list[str]) -> dict[str, dict[str, float]]:
        rows = self._store.get_online_features(features=ITEM_STATS_FEATURES,
                                               entity_rows=[{"item_id": item} for item in item_ids]).to_dict()
        return {item: _stats_or_priors({name: rows[name][i] for name in STATS_FIELDS})
                for i, item in enumerate(item_ids)}

    async def user_context(self, user_id: str) -> dict[str, Any] | None:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._user, user_id)

    async def item_stats(self, item_ids: list[str]) -> dict[str, dict[str, float]]:
        if not item_ids:
            return {}
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._stats, item_ids)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class LiveRewrites:
    """A query's live rewrites, best first, and the rewriter version they came from (None when
    there are none)."""

    texts: list[str]
    version: str | None


class RewriteStore(Protocol):
    """Rewrites for a normalised query (``tailbridge.vocab.normalize_query``)."""

    async def get(self, query_key: str) -> LiveRewrites: ...


class RedisRewriteStore:
    """The live lists of the rewrite store (``streams.rewrite_store``), read with the version
    each was written by, in one transaction. Empty until a rewriter writes them: search never
    invents rewrites. Reads are async (search); ``put`` is a sync write of one live list."""

    def __init__(self, url: str, project: str, timeout_s: float = REDIS_SOCKET_TIMEOUT_S):
        self._url, self._timeout_s, self._project = url, timeout_s, project
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def key(self, query_key: str) -> str:
        return rewrite_store.live_prefix(self._project) + query_key

    async def get(self, query_key: str) -> LiveRewrites:
        async with self._redis.pipeline(transaction=True) as pipe:
            rewrite_store.live_rewrites(pipe, self._project, query_key)
            texts, version, serving = await pipe.execute()
        texts = [raw.decode() for raw in texts]
        version = version or serving
        return LiveRewrites(texts, version.decode() if texts and version else None)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    def put(self, query_key: str, rewrites: list[str], version: str) -> None:
        """Replace a query's live rewrites, as written by ``version`` (tests and tools; the
        rewriter writes through ``streams.rewrite_store.RewriteWriter``)."""
        with redis.Redis.from_url(self._url, socket_timeout=self._timeout_s) as r, r.pipeline(transaction=True) as pipe:
            rewrite_store.RewriteWriter(r, self._project).set_live(pipe, version, query_key, rewrites)
            pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
