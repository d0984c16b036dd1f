"""The query handler's HTTP app (FastAPI), run by ``tailbridge serve``.

    POST /search    personalised hybrid search (serving.search)
    POST /events    interactions from the frontend, validated, published to Kafka (202)
    GET  /healthz   the process answers
    GET  /readyz    each dependency's state; 503 until search can answer
    GET  /metrics   Prometheus: per-stage latency, degradations, errors, dropped events
    GET  /users     shoppers that have a real-time context (the search page's user selector)
    GET  /          the search page (static/index.html)

Clients are built once in ``build_components`` and reach the endpoints through FastAPI
dependencies, so tests can build the app against their own stack.
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import redis
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from tailbridge.serving.context import FeastContextReader, RedisRewriteStore
from tailbridge.serving.metrics import Metrics
from tailbridge.serving.models import load_ranker
from tailbridge.serving.publisher import EventPublisher
from tailbridge.serving.schemas import EventAccepted, Readiness, SearchRequest, SearchResponse
from tailbridge.serving.search import ItemIndex, SearchService, SearchUnavailable
from tailbridge.streams.behaviour import Keys
from tailbridge.streams.events import InteractionEvent
from tailbridge.settings import Settings, get_settings

log = logging.getLogger(__name__)
PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class Components:
    settings: Settings
    metrics: Metrics
    service: SearchService
    publisher: EventPublisher
    rewrites: RedisRewriteStore | None
    context_error: str | None  # why there is no user-context reader, if there is none
    redis_url: str | None = None  # the online store's Redis (None: SQLite), where the workers keep user states

    def close(self) -> None:
        self.service.close()
        self.publisher.close()


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
    rewrites = RedisRewriteStore(online.redis_url, settings.feast_project) if online.kind == "redis" else None
    service = SearchService(settings, metrics, ItemIndex(settings), publisher, read_context, rewrites,
                            load_ranker(settings))
    return Components(settings, metrics, service, publisher, rewrites, context_error,
                      online.redis_url if online.kind == "redis" else None)


def components(request: Request) -> Components:
    return request.app.state.components


Deps = Annotated[Components, Depends(components)]


def create_app(settings: Settings | None = None, built: Components | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.components = built or build_components(settings or get_settings())
        warm_up(app.state.components.service)
        yield
        app.state.components.close()

    app = FastAPI(title="tailbridge query handler", version="1", lifespan=lifespan,
                  description="Personalised hybrid product search over real-time features.")

    @app.exception_handler(SearchUnavailable)
    async def _unavailable(_request: Request, exc: SearchUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.post("/search", response_model=SearchResponse, responses={503: {"description": "The item index is unreachable."}})
    def search(body: SearchRequest, deps: Deps) -> SearchResponse:
        try:
            return deps.service.search(body)
        except SearchUnavailable:
            deps.metrics.errors.labels("index_unavailable").inc()
            raise

    @app.post("/events", status_code=202, response_model=EventAccepted,
              responses={503: {"description": "The event buffer is full (broker down for long)."}})
    def events(body: InteractionEvent, deps: Deps) -> EventAccepted:
        topic = deps.publisher.publish(body)
        if topic is None:
            raise HTTPException(503, "event buffer full: the broker is unreachable; retry later")
        return EventAccepted(event_id=body.event_id, topic=topic)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    def readyz(deps: Deps, response: Response) -> Readiness:
        state = dependency_states(deps)
        ready = state["milvus"].startswith("ok")
        response.status_code = 200 if ready else 503
        return Readiness(ready=ready, dependencies=state)

    @app.get("/metrics")
    def metrics(deps: Deps) -> Response:
        return Response(generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/users", response_model=UserList)
    def users(deps: Deps, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> UserList:
        return users_with_context(deps, limit)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE)

    return app


class UserList(BaseModel):
    user_ids: list[str] = Field(description="Shoppers whose user_context row is not empty now, sorted.")
    source: str = Field(description="Where the candidates came from, and how many were looked at.")


USER_SCAN_KEYS = 200_000  # Redis keys looked at, at most, per /users call (a shared Redis holds many)


def users_with_context(deps: Components, limit: int) -> UserList:
    """Shoppers a search would personalise, for the page's selector and for benchmarks.

    Candidates are the users the stream workers keep state for (Redis keys
    ``tb:<project>:user:<id>``, SCANned, so no demo file has to be where the app runs); each is
    then read through the same Feast reader search uses and kept only when its context is not
    empty, so every id listed gets ``personalized: true`` right now. No Redis (the SQLite
    fallback has no workers), no context reader, or an unreachable Redis: an empty list, and
    ``source`` says why."""
    read = deps.service.read_context
    if read is None:
        return UserList(user_ids=[], source=f"no user-context reader: {deps.context_error}")
    if deps.redis_url is None:
        return UserList(user_ids=[], source="no Redis online store (SQLite): no stream worker keeps user states")
    prefix = Keys(deps.settings).user("")
    client = redis.Redis.from_url(deps.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    candidates: list[str] = []
    scanned = 0
    try:
        # SCAN MATCH is a glob: escape the project name's glob characters.
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*"
        cursor = 0
        while True:
            cursor, keys = client.scan(cursor, match=pattern, count=2000)
            scanned += 2000
            candidates += [key.decode(errors="replace")[len(prefix):] for key in keys]
            if cursor == 0 or len(candidates) >= 3 * limit or scanned >= USER_SCAN_KEYS:
                break
    except redis.RedisError as exc:
        return UserList(user_ids=[], source=f"Redis at {deps.redis_url} failed: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    found: list[str] = []
    try:
        for user_id in sorted(set(candidates)):  # Redis answered, so Feast's reads will not hang
            if read(user_id) is not None:
                found.append(user_id)
                if len(found) == limit:
                    break
    except Exception as exc:  # noqa: BLE001  the selector falls back to anonymous; say why
        return UserList(user_ids=found, source=f"Feast user_context read failed: {type(exc).__name__}: {exc}")
    return UserList(user_ids=found, source=f"stream-worker user states in Redis ({len(set(candidates))} candidates), "
                                           "kept those whose Feast user_context is not empty")


def warm_up(service: SearchService) -> None:
    """Load the encoder and make the first reads now, outside any deadline, not on the first search."""
    try:
        encoder, _ = service.index.ready()
        encoder.encode_queries(["warm up"], [None])
    except SearchUnavailable as exc:
        log.warning("not ready yet: %s", exc)
    if service.read_context is not None:
        try:
            service.read_context("__warm_up__")
        except Exception as exc:  # reported by /readyz and degraded searches
            log.warning("user context not available yet: %s", exc)


def dependency_states(deps: Components) -> dict[str, str]:
    service = deps.service
    state: dict[str, str] = {}
    try:
        service.index.ready(probe=True)
        state["milvus"] = f"ok (serving {service.index.version})"
    except SearchUnavailable as exc:
        state["milvus"] = str(exc)
    if service.read_context is None:
        state["user_context"] = f"unavailable: {deps.context_error}"
    else:
        outcome = service.context_guard.call(lambda: service.read_context("__readyz__"))
        state["user_context"] = "ok" if outcome.ok else outcome.error
    if deps.rewrites is None:
        state["rewrites"] = "unavailable: no Redis (the online store is SQLite)"
    else:
        outcome = service.rewrites_guard.call(deps.rewrites.ping)
        state["rewrites"] = "ok" if outcome.ok else outcome.error
    state["kafka"] = deps.publisher.state
    state["ranker"] = f"ok ({service.ranker.version})" if service.ranker is not None else \
        "none (results in retrieval order; train one with `tailbridge train ranker`)"
    return state
