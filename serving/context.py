"""The shopper's real-time context and the candidates' behaviour stats, read from the Feast
``user_context`` and ``item_stats`` views the stream workers keep, and the rewrite store
(normalised query -> rewrites) that the rewriter fills ahead of time. All are optional for
search: the handler calls them through ``serving.guard``.
"""

from __future__ import annotations

from typing import Any, Protocol

import redis

from tailbridge.feature_repo.definitions import user_context
from tailbridge.models.data.user_context import as_context
from tailbridge.settings import Settings
from tailbridge.streams.item_stats import NO_STATS, STATS_FIELDS

# `features`, not `schema`: Feast's apply() adds the entity column (user_id) to the view's schema
# in place, so a process that applied the repo before importing this module would ask for
# "user_context:user_id" and every context read would fail.
USER_CONTEXT_FEATURES = [f"user_context:{field.name}" for field in user_context.features]
ITEM_STATS_FEATURES = [f"item_stats:{name}" for name in STATS_FIELDS]


class FeastContextReader:
    """The online reads of a search: the user's row, and one batch for the candidates' stats.
    Feast is imported and the registry loaded once, here, not per request (``import feast``
    alone costs seconds)."""

    def __init__(self, settings: Settings):
        from tailbridge.feature_repo.store import feature_store

        self._store = feature_store(settings)
        self._store.refresh_registry()

    def __call__(self, user_id: str) -> dict[str, Any] | None:
        """The user's feature row, or None when the user has none yet (not an error)."""
        row = self._store.get_online_features(features=USER_CONTEXT_FEATURES, entity_rows=[{"user_id": user_id}]).to_dict()
        return as_context({name: values[0] for name, values in row.items()})

    def item_stats(self, item_ids: list[str]) -> dict[str, dict[str, float]]:
        """Each item's ``STATS_FIELDS``, in one read; the priors (``NO_STATS``) for an item
        without a row (nobody engaged with it in the view's TTL)."""
        if not item_ids:
            return {}
        rows = self._store.get_online_features(features=ITEM_STATS_FEATURES,
                                               entity_rows=[{"item_id": item} for item in item_ids]).to_dict()
        return {item: {name: rows[name][i] for name in STATS_FIELDS} if rows[STATS_FIELDS[0]][i] is not None
                else dict(NO_STATS) for i, item in enumerate(item_ids)}


class RewriteStore(Protocol):
    """Rewrites for a normalised query (``tailbridge.vocab.normalize_query``), best first."""

    version: str

    def get(self, query_key: str) -> list[str]: ...


class RedisRewriteStore:
    """Rewrites as a Redis list per query key. Empty until a rewriter writes it: search
    never invents rewrites."""

    version = "redis-rewrites-v1"

    def __init__(self, url: str, project: str, timeout_s: float = 0.2):
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._root = f"tb:{project}:rewrites"

    def key(self, query_key: str) -> str:
        return f"{self._root}:{query_key}"

    def get(self, query_key: str) -> list[str]:
        return [raw.decode() for raw in self._redis.lrange(self.key(query_key), 0, -1)]

    def put(self, query_key: str, rewrites: list[str]) -> None:
        """Replace a query's rewrites (the rewriter's write; tests use it too)."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(query_key))
            if rewrites:
                pipe.rpush(self.key(query_key), *rewrites)
            pipe.execute()

    def ping(self) -> bool:
        return bool(self._redis.ping())
