"""Every client the query handler uses, built once per app, and the FastAPI dependency that
hands them to the routes (``ComponentsDep``).

``build_components`` makes the metrics registry, the event publisher, the online-feature
reader (user context and item stats: async reads of Feast's Redis rows, or Feast itself on
threads for the SQLite store), the rewrite store, the item index (Milvus, and the query
encoders it loads for the serving version), the ranker and the search service over them.
``create_app`` accepts them built already, so the CLI can fail on bad settings before serving
and tests can build the app against their own stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request

from tailbridge.serving.context import FeastOnlineFeatures, OnlineFeatures, RedisOnlineFeatures, RedisRewriteStore
from tailbridge.serving.index import SearchUnavailable, ServingIndex
from tailbridge.serving.metrics import Metrics
from tailbridge.serving.models import load_ranker
from tailbridge.serving.publisher import EventPublisher
from tailbridge.serving.search import SearchService
from tailbridge.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Components:
    settings: Settings
    metrics: Metrics
    service: SearchService
    publisher: EventPublisher
    rewrites: RedisRewriteStore | None
    context_error: str | None  # why there is no user-context reader, if there is none
    redis_url: str | None = None  # the online store's Redis (None: SQLite), where the workers keep user states
    user_states: redis.Redis | None = None  # a client of that Redis for /users and /readyz (None: SQLite)

    async def warm_up(self) -> None:
        """Load the encoders and open the first connections now, outside any deadline, not on
        the first searches."""
        service = self.service
        try:
            serving = await service.index.refresh()
            await serving.encoders.encode(["warm up"], [None])
        except SearchUnavailable as exc:
            log.warning("not ready yet: %s", exc)
        if service.features is not None:
            try:
                await service.features.user_context("__warm_up__")
                await service.features.item_stats(["__warm_up__"])
            except Exception as exc:  # reported by /readyz and degraded searches
                log.warning("user context and item stats not available yet: %s", exc)

    async def close(self) -> None:
        self.service.close()
        self.publisher.close()
        if self.service.features is not None:
            await self.service.features.close()
        if self.rewrites is not None:
            await self.rewrites.close()
        if self.user_states is not None:
            self.user_states.close()


def build_components(settings: Settings) -> Components:
    from tailbridge.feature_repo.online import resolve_online_store

    metrics = Metrics()
    publisher = EventPublisher(settings, metrics)
    online = resolve_online_store(settings)
    redis_url = online.redis_url if online.kind == "redis" else None
    features: OnlineFeatures | None = None
    context_error = None
    try:
        features = RedisOnlineFeatures(settings, redis_url) if redis_url else FeastOnlineFeatures(settings)
    except Exception as exc:  # no registry yet, unreadable config...: serve unpersonalised, say why
        context_error = f"{type(exc).__name__}: {exc} (run `tailbridge features apply`)"
        log.warning("user context disabled: %s", context_error)
    rewrites = RedisRewriteStore(redis_url, settings.feast_project) if redis_url is not None else None
    # /users scans many keys: a longer timeout than the rewrite store's per-search deadline.
    user_states = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0) \
        if redis_url is not None else None
    index = ServingIndex(settings)
    service = SearchService(settings, metrics, index, publisher, features, rewrites, load_ranker(settings))
    return Components(settings, metrics, service, publisher, rewrites, context_error, redis_url, user_states)


def get_components(request: Request) -> Components:
    return request.app.state.components


ComponentsDep = Annotated[Components, Depends(get_components)]
