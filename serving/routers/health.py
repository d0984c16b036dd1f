"""GET /healthz (the process answers), /readyz (each dependency's state, and the stream
workers'; 503 until search can answer) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tailbridge.serving.dependencies import Components, ComponentsDep
from tailbridge.serving.schemas import Readiness
from tailbridge.serving.index import SearchUnavailable
from tailbridge.streams import heartbeat

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(deps: ComponentsDep, response: Response) -> Readiness:
    state = await dependency_states(deps)
    ready = state["milvus"].startswith("ok")
    response.status_code = 200 if ready else 503
    return Readiness(ready=ready, dependencies=state)


@router.get("/metrics")
def metrics(deps: ComponentsDep) -> Response:
    return Response(generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def dependency_states(deps: Components) -> dict[str, str]:
    service = deps.service
    state: dict[str, str] = {}
    try:
        serving = await service.index.refresh()
        state["milvus"] = f"ok (serving {serving.version})"
    except SearchUnavailable as exc:
        state["milvus"] = str(exc)
    if service.features is None:
        state["user_context"] = f"unavailable: {deps.context_error}"
    else:
        outcome = await service.context_guard.call(lambda: service.features.user_context("__readyz__"))
        state["user_context"] = "ok" if outcome.ok else outcome.error
    if deps.rewrites is None:
        state["rewrites"] = "unavailable: no Redis (the online store is SQLite)"
    else:
        outcome = await service.rewrites_guard.call(deps.rewrites.ping)
        state["rewrites"] = "ok" if outcome.ok else outcome.error
    state["kafka"] = deps.publisher.state
    state["stream_worker"] = await asyncio.to_thread(stream_worker_state, deps)
    state["ranker"] = f"ok ({service.ranker.version})" if service.ranker is not None else \
        "none (results in retrieval order; train one with `tailbridge train ranker`)"
    return state


def stream_worker_state(deps: Components) -> str:
    """From the workers' status records (``streams.heartbeat``): 'ok (...)', or a worker that
    is stuck or lagging. Search answers either way (with staler features), so it does not
    decide readiness."""
    if deps.user_states is None:
        return "unknown: no Redis (the online store is SQLite), where workers keep their status"
    try:
        return heartbeat.summary(heartbeat.read_workers(deps.user_states, deps.settings), deps.settings)
    except redis.RedisError as exc:
        return f"unknown: Redis at {deps.redis_url} failed: {type(exc).__name__}: {exc}"
