"""GET /healthz (the process answers), /readyz (each dependency's state; 503 until search can
answer) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tailbridge.serving.dependencies import Components, ComponentsDep
from tailbridge.serving.schemas import Readiness
from tailbridge.serving.search import SearchUnavailable

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(deps: ComponentsDep, response: Response) -> Readiness:
    state = dependency_states(deps)
    ready = state["milvus"].startswith("ok")
    response.status_code = 200 if ready else 503
    return Readiness(ready=ready, dependencies=state)


@router.get("/metrics")
def metrics(deps: ComponentsDep) -> Response:
    return Response(generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
