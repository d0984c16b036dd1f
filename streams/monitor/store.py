"""Where the monitor's findings live for the page and the report: capped Redis lists of window
reports and alerts (JSON, newest first) and a status hash, under the Feast project's prefix."""

from __future__ import annotations

from datetime import datetime

import orjson

from tailbridge.settings import Settings

KEEP_REPORTS = 8640  # 24 h of 10 s buckets
KEEP_ALERTS = 2000


def keys(settings: Settings) -> dict[str, str]:
    base = f"tb:{settings.feast_project}:monitor"
    return {"reports": f"{base}:reports", "alerts": f"{base}:alerts", "status": f"{base}:status"}


def write(redis, settings: Settings, reports: list[dict], alerts: list[dict], status: dict) -> None:
    """One transaction: the new reports and alerts (oldest first in, so newest is first out)."""
    k = keys(settings)
    pipe = redis.pipeline(transaction=True)
    if reports:
        pipe.lpush(k["reports"], *(orjson.dumps(r) for r in reports))
        pipe.ltrim(k["reports"], 0, KEEP_REPORTS - 1)
    if alerts:
        pipe.lpush(k["alerts"], *(orjson.dumps(a) for a in alerts))
        pipe.ltrim(k["alerts"], 0, KEEP_ALERTS - 1)
    pipe.set(k["status"], orjson.dumps(status))
    pipe.execute()


def read(redis, settings: Settings, since: datetime | None = None, limit: int = KEEP_REPORTS) -> dict:
    """Reports and alerts (oldest first) whose window ended at or after ``since``, and the status."""
    k = keys(settings)
    since_ms = int(since.timestamp() * 1000) if since else 0
    pipe = redis.pipeline(transaction=False)
    pipe.lrange(k["reports"], 0, limit - 1)
    pipe.lrange(k["alerts"], 0, KEEP_ALERTS - 1)
    pipe.get(k["status"])
    raw_reports, raw_alerts, raw_status = pipe.execute()
    reports = [r for r in map(orjson.loads, raw_reports) if r["end_ms"] >= since_ms]
    alerts = [a for a in map(orjson.loads, raw_alerts) if a["end_ms"] >= since_ms]
    return {"reports": reports[::-1], "alerts": alerts[::-1], "status": orjson.loads(raw_status) if raw_status else None}
