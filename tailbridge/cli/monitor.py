"""`tailbridge monitor run | report`: the drift monitor (streams/monitor) and its offline report."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tailbridge.settings import get_settings

monitor_app = typer.Typer(help="Online drift monitoring of queries, results, interactions, Feast features and outcomes.",
                          no_args_is_help=True)
console = Console()
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``1d`` ago, or an ISO time (UTC when it has no zone)."""
    now = now or datetime.now(UTC)
    if match := _AGO.match(text.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return now - timedelta(**{unit: float(match[1])})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected e.g. 30m, 2h, 1d or an ISO time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@monitor_app.command("run")
def run(loglevel: Annotated[str, typer.Option(help="faust log level.")] = "warning") -> None:
    """Run the drift monitor: its own consumer group over queries and interactions, reading the
    Feast rows of a sample of their users and items (TAILBRIDGE_MONITOR_FEATURE_SAMPLE per
    bucket); reports and alerts to Redis (/monitor, `monitor report`), alerts to the drift_alerts
    topic, query_stats to Feast, scores to Prometheus on TAILBRIDGE_MONITOR_METRICS_PORT."""
    from prometheus_client import start_http_server

    from tailbridge.cli.faust_worker import run_and_exit
    from tailbridge.streams.monitor.processor import create_monitor_app

    settings = get_settings()
    app, metrics = create_monitor_app(settings)
    if settings.monitor_metrics_port:
        start_http_server(settings.monitor_metrics_port, addr="127.0.0.1", registry=metrics.registry)
        console.print(f"monitor metrics on http://127.0.0.1:{settings.monitor_metrics_port}/metrics")
    run_and_exit(app, loglevel)


@monitor_app.command("report")
def report(
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
    since: Annotated[str, typer.Option(help="Windows ending after this: 30m, 2h, 1d ago or an ISO time.")] = "1d",
) -> None:
    """A self-contained HTML report (charts inline) of drift scores, outcomes per model version
    and alerts since a time, with how the thresholds were calibrated."""
    import redis

    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.streams.monitor import report as render
    from tailbridge.streams.monitor import store

    settings = get_settings()
    online = resolve_online_store(settings)
    if online.kind != "redis":
        console.print("[bold red]error:[/] the monitor's reports live in Redis; the online store is SQLite")
        raise typer.Exit(1)
    start = parse_since(since)
    try:
        data = store.read(redis.Redis.from_url(online.redis_url, socket_timeout=5), settings, start)
    except redis.RedisError as exc:
        console.print(f"[bold red]error:[/] Redis at {online.redis_url}: {exc}")
        raise typer.Exit(1) from None
    out.write_text(render.render(data, start))
    console.print(f"wrote {out}: {len(data['reports'])} windows, {len(data['alerts'])} alerts since {start:%Y-%m-%d %H:%M} UTC")
