"""The shopper's real-time context, read from the Feast ``user_context`` view the stream
workers keep, and the rewrite store (normalised query -> rewrites) that the rewriter fills
ahead of time. Both are optional for search: the handler calls them through ``serving.guard``.
"""

from __future__ import annotations

from typing import Any, Protocol

import redis

from tailbridge.feature_repo.definitions import user_context
from tailbridge.models.data.user_context import as_context
from tailbridge.settings import Settings

# `features`, not `schema`: Feast's apply() adds the entity column (user_id) to the view's schema
# in place, so a process that applied the repo before importing this module would ask for
# "user_context:user_id" and every context read would fail.
USER_CONTEXT_FEATURES = [f"user_context:{field.name}" for field in user_context.features]


class FeastContextReader:
    """One online read per search. Feast is imported and the registry loaded once, here,
    not per request (``import feast`` alone costs seconds)."""

    def __init__(self, settings: Settings):
        from tailbridge.feature_repo.store import feature_store

        self._store = feature_store(settings)
        self._store.refresh_registry()

    def __call__(self, user_id: str) -> dict[str, Any] | None:
        """The user's feature row, or None when the user has none yet (not an error)."""
        row = self._store.get_online_features(features=USER_CONTEXT_FEATURES, entity_rows=[{"user_id": user_id}]).to_dict()
        return as_context({name: values[0] for name, values in row.items()})


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
