"""The query handler's HTTP app (FastAPI), run by ``tailbridge serve``.

    POST /search    personalised hybrid search                                  routers/search.py
    POST /events    interactions from the frontend, published to Kafka (202)    routers/events.py
    GET  /users     shoppers that have a real-time context (the page's selector) routers/events.py
    GET  /healthz   the process answers                                         routers/health.py
    GET  /readyz    each dependency's state; 503 until search can answer        routers/health.py
    GET  /metrics   Prometheus: per-stage latency, degradations, errors, drops  routers/health.py
    GET  /          the search page (static/index.html)                         routers/page.py
    GET  /monitor   drift scores, outcomes per model version, alerts (+ /data)  routers/monitor.py

The clients are built once, in ``serving.dependencies``, when the app starts (or handed in
built), and reach the routes through the ``ComponentsDep`` dependency. Request bodies and
validation errors are bounded by ``serving.limits`` (413, short 422s).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tailbridge.serving.dependencies import Components, build_components
from tailbridge.serving.limits import BodyLimit, validation_errors
from tailbridge.serving.routers import events, health, monitor, page, search
from tailbridge.serving.index import SearchUnavailable
from tailbridge.settings import Settings, get_settings


def create_app(settings: Settings | None = None, built: Components | None = None) -> FastAPI:
    settings = built.settings if built else settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.components = built or build_components(settings)
        await app.state.components.warm_up()
        yield
        await app.state.components.close()

    app = FastAPI(title="tailbridge query handler", version="1", lifespan=lifespan,
                  description="Personalised hybrid product search over real-time features.")

    @app.exception_handler(SearchUnavailable)
    async def _unavailable(_request: Request, exc: SearchUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    app.add_exception_handler(RequestValidationError, validation_errors)
    app.add_middleware(BodyLimit, max_bytes=settings.serve_max_body_bytes)

    for module in (search, events, health, page, monitor):
        app.include_router(module.router)
    return app
