"""GET /monitor: the drift monitor's page (static/monitor.html), and GET /monitor/data, the
reports and alerts it draws (``streams.monitor.store``, written by `tailbridge monitor run`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from tailbridge.serving.dependencies import ComponentsDep
from tailbridge.streams.monitor import store

PAGE = Path(__file__).parent.parent / "static" / "monitor.html"

router = APIRouter()


@router.get("/monitor", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE)


@router.get("/monitor/data")
def data(deps: ComponentsDep, minutes: float = Query(60.0, gt=0, le=7 * 24 * 60)) -> dict:
    """Window reports (drift score and threshold per test and window, outcomes per model version)
    and alerts of the last ``minutes``, oldest first, and the monitor's status."""
    if deps.user_states is None:
        raise HTTPException(503, "the drift monitor keeps its reports in Redis; this online store is SQLite")
    try:
        return store.read(deps.user_states, deps.settings, datetime.now(UTC) - timedelta(minutes=minutes))
    except redis.RedisError as exc:
        raise HTTPException(503, f"Redis: {type(exc).__name__}: {exc}") from None
