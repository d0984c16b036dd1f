"""Every client the query handler uses, built once per app, and the FastAPI dependency that
hands them to the routes (``ComponentsDep``).

``build_components`` makes the metrics registry, the event publisher, the Feast reader (user
context and item stats), the rewrite store, the item index (Milvus, and the query encoder it
loads for the serving version), the ranker and the search service over them. ``create_app`` accepts them
built already, so the CLI can fail on bad settings before serving and tests can build the
app against their own stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request

from tailbridge.serving.context import FeastContextReader, RedisRewriteStore
from tailbridge.serving.metrics import Metrics
from tailbridge.serving.models import load_ranker
from tailbridge.serving.publisher import EventPublisher
from tailbridge.serving.search import ItemIndex, SearchService, SearchUnavailable
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
    user_states: redis.Redis | None = None  # a client of that Redis for /users (None: SQLite)

    def warm_up(self) -> None:
        """Load the encoder and make the first reads now, outside any deadline, not on the first search."""
        service = self.service
        try:
            encoder, _ = service.index.ready()
            encoder.encode_queries(["warm up"], [None])
        except SearchUnavailable as exc:
            log.warning("not ready yet: %s", exc)
        if service.read_context is not None:
            try:
                service.read_context("__warm_up__")
                service.read_item_stats(["__warm_up__"])
            except Exception as exc:  # reported by /readyz and degraded searches
                log.warning("user context and item stats not available yet: %s", exc)

    def close(self) -> None:
        self.service.close()
        self.publisher.close()
        if self.user_states is not None:
            self.user_states.close()


def build_components(settings: Settings) -> Components:
    from tailbridge.feature_repo.online import resolve_online_store

    metrics = Metrics()
    publisher = EventPublisher(settings, metrics)
    online = resolve_online_store(settings)
    read_context, context_error = None, None
    try:
        read_context = FeastContextReader(settings)
    except Exception as exc:  # no registry yet, unreadable config...: serve unpersonalised, say why
        context_error = f"{type(exc).__name__}: {exc} (run `tailbridge features apply`)"
        log.warning("user context disabled: %s", context_error)
    redis_url = online.redis_url if online.kind == "redis" else None
    rewrites = RedisRewriteStore(redis_url, settings.feast_project) if redis_url is not None else None
    # /users scans many keys: a longer timeout than the rewrite store's per-search deadline.
    user_states = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0) \
        if redis_url is not None else None
    service = SearchService(settings, metrics, ItemIndex(settings), publisher, read_context,
                            read_context.item_stats if read_context is not None else None, rewrites,
                            load_ranker(settings))
    return Components(settings, metrics, service, publisher, rewrites, context_error, redis_url, user_states)


def get_components(request: Request) -> Components:
    return request.app.state.components


ComponentsDep = Annotated[Components, Depends(get_components)]
