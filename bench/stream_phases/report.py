"""The stream benchmark's report: the table of every run and the median, the pooled
freshness percentiles against the targets, where the in-process time goes, memory and CPU
per window, and one line per target naming the stage that dominates."""

from __future__ import annotations

import os
import statistics
from typing import Any

from rich.table import Table

from tailbridge.bench.common import console, fmt, get, latency_summary, pct

TARGETS = {
    "throughput": (">= 5,000 events/s sustained", lambda v: v >= 5000),
    "freshness": ("p99 <= 1 s at 1,000 events/s", lambda v: v <= 1000),
    "vectors": ("p99 <= 5 s at 50 updates/s", lambda v: v <= 5000),
}
WORKER_PHASES = ("throughput", "freshness", "vectors", "consume")


# (label, path in a run's result, unit, digits, target key)
ROWS = [
    ("throughput: applied events/s (first→last)", "throughput.events_per_s", "", 0, "throughput"),
    ("throughput: applied events/s (10%→90%)", "throughput.events_per_s_10_90", "", 0, None),
    ("throughput: applied events/s (50%→100%)", "throughput.events_per_s_second_half", "", 0, None),
    ("throughput: publish events/s", "throughput.publish_events_per_s", "", 0, None),
    ("throughput: worker start-up to first apply", "throughput.startup_s", " s", 1, None),
    ("throughput: Feast lag after counter", "throughput.feast_lag_after_counter_s", " s", 2, None),
    ("freshness: probe p50", "freshness.probes.p50_ms", " ms", 0, None),
    ("freshness: probe p99", "freshness.probes.p99_ms", " ms", 0, "freshness"),
    ("freshness: probe max", "freshness.probes.max_ms", " ms", 0, None),
    ("freshness: probes", "freshness.probes.count", "", 0, None),
    ("freshness: published events/s", "freshness.publish_events_per_s", "", 0, None),
    ("freshness: backlog when publisher done (events)", "freshness.backlog_at_publish_end", "", 0, None),
    ("freshness: drain after publisher done", "freshness.drain_after_publish_s", " s", 2, None),
    ("freshness: Kafka delivery p50 (of probe)", "freshness.kafka_delivery.p50_ms", " ms", 0, None),
    ("freshness: Kafka delivery p99 (of probe)", "freshness.kafka_delivery.p99_ms", " ms", 0, None),
    ("freshness: Feast poll (get_online_features)", "freshness.poll_ms_median", " ms", 1, None),
    ("consume: no-op faust agent events/s (decode only)", "consume.events_per_s", "", 0, None),
    ("consume: no-op agent probe p50 (freshness rate)", "consume.probes.p50_ms", " ms", 0, None),
    ("consume: no-op agent probe p99 (freshness rate)", "consume.probes.p99_ms", " ms", 0, None),
    ("consume: no-op agent median batch (freshness rate)", "consume.median_batch_at_rate", "", 0, None),
    ("vectors: update p50", "vectors.updates.p50_ms", " ms", 0, None),
    ("vectors: update p99", "vectors.updates.p99_ms", " ms", 0, "vectors"),
    ("vectors: update max", "vectors.updates.max_ms", " ms", 0, None),
    ("vectors: updates", "vectors.updates.count", "", 0, None),
    ("vectors: published updates/s", "vectors.publish_updates_per_s", "", 1, None),
    ("vectors: worker sustained updates/s", "vectors.worker_updates_per_s", "", 1, None),
    ("vectors: Milvus poll (query by id)", "vectors.query_ms_median", " ms", 1, None),
    ("vectors: catalog bulk index items/s", "vectors.catalog_index_items_per_s", "", 0, None),
]


def pooled(runs: list[dict], phase: str) -> list[float]:
    return [v for r in runs for v in (get(r, f"{phase}.latencies_ms") or [])]


def summarise(runs: list[dict]) -> dict:
    summary: dict[str, Any] = {}
    paths = {path for _, path, *_ in ROWS}
    paths |= {f"stages.behaviour_batch.{k}" for r in runs for k in (get(r, "stages.behaviour_batch") or {})}
    paths |= {f"stages.index_batch.{k}" for r in runs for k in (get(r, "stages.index_batch") or {})}
    for path in sorted(paths):
        values = [v for r in runs if isinstance(v := get(r, path), (int, float))]
        if values:
            summary[path] = {"median": statistics.median(values), "p99": pct(values, 99), "min": min(values),
                             "max": max(values), "values": values}
    for phase in ("freshness", "vectors", "consume"):
        lat = pooled(runs, phase)
        if lat:
            summary[f"{phase}.pooled"] = latency_summary(lat)
    return summary


def verdicts(summary: dict) -> dict:
    out = {}
    checks = {"throughput": summary.get("throughput.events_per_s", {}).get("median"),
              "freshness": summary.get("freshness.pooled", {}).get("p99_ms"),
              "vectors": summary.get("vectors.pooled", {}).get("p99_ms")}
    for key, value in checks.items():
        text, ok = TARGETS[key]
        out[key] = {"target": text, "value": value, "pass": None if value is None else bool(ok(value))}
    return out


def verdict_cell(v: dict | None) -> str:
    if v is None or v["pass"] is None:
        return "[yellow]n/a[/]"
    return "[green]PASS[/]" if v["pass"] else "[red]MISS[/]"


def print_results(mode: str, runs: list[dict], summary: dict, verdict: dict, stack_memory: dict) -> None:
    table = Table(title="tailbridge stream worker benchmark" + ("" if mode == "default" else f" (--{mode})"))
    table.add_column("metric")
    for i in range(len(runs)):
        table.add_column(f"run {i + 1}", justify="right")
    table.add_column("median", justify="right")
    table.add_column("target")
    table.add_column("", justify="center")
    for label, path, unit, digits, target in ROWS:
        values = [get(r, path) for r in runs]
        if all(v is None for v in values):
            continue
        median = summary.get(path, {}).get("median")
        target_text = TARGETS[target][0] if target else ""
        cell = verdict_cell(verdict.get(target)) if target == "throughput" else ""
        table.add_row(label, *(fmt(v, digits, unit) for v in values), fmt(median, digits, unit), target_text, cell)
    for phase, label in (("freshness", "freshness"), ("vectors", "vectors")):
        p = summary.get(f"{phase}.pooled")
        if p:
            table.add_row(f"[bold]{label}: pooled p50 / p99 / max[/] ({p['count']} samples)", *([""] * len(runs)),
                          f"{p['p50_ms']:,.0f} / {p['p99_ms']:,.0f} / {p['max_ms']:,.0f} ms",
                          TARGETS[phase][0], verdict_cell(verdict.get(phase)))
    console.print(table)

    # where the time goes
    stage = Table(title="where the time goes: in-process median ms per batch (bench process, 1 torch thread)")
    stage.add_column("stage")
    stage.add_column("median ms", justify="right")
    stage.add_column("share", justify="right")
    stage.add_column("runs (ms)", justify="right")
    for block, title in (("behaviour_batch", "BehaviourProcessor.process, 500 events"),
                         ("index_batch", "Indexer.process, 50 items")):
        keys = [k for k in (get(runs[0], f"stages.{block}") or {}) if k.endswith("_ms")] if runs else []
        if not keys:
            continue
        total = summary.get(f"stages.{block}.total_ms", {}).get("median") or 0
        stage.add_row(f"[bold]{title}[/]", "", "", "")
        for k in keys:
            s = summary.get(f"stages.{block}.{k}")
            if not s:
                continue
            share = "" if k == "total_ms" else f"{100 * s['median'] / total:.0f}%" if total else ""
            stage.add_row(f"  {k.removesuffix('_ms')}", f"{s['median']:,.1f}", share,
                          " / ".join(f"{v:,.1f}" for v in s["values"]))
        rate_key = "events_per_s_in_process" if block == "behaviour_batch" else "items_per_s_in_process"
        s = summary.get(f"stages.{block}.{rate_key}")
        if s:
            stage.add_row(f"  = {rate_key.replace('_', ' ')}", f"{s['median']:,.0f}", "", "")
    flush = [get(r, "stages.item_stats_flush") for r in runs if get(r, "stages.item_stats_flush")]
    if flush:
        stage.add_row("[bold]item-stats flush (1 per worker_flush_seconds)[/]", "", "", "")
        total = statistics.median(f["ms"] for f in flush)
        for key in ("feast_write_ms", "milvus_query_ms", "milvus_upsert_ms"):
            value = statistics.median(f.get(key, 0.0) for f in flush)
            stage.add_row(f"  {key.removesuffix('_ms')}", f"{value:,.1f}", f"{100 * value / total:.0f}%" if total else "",
                          " / ".join(f"{f.get(key, 0.0):,.1f}" for f in flush))
        stage.add_row(f"  total ({flush[0]['items']} dirty items)", f"{total:,.1f}", "",
                      " / ".join(f"{f['ms']:,.1f}" for f in flush))
    if stage.row_count:
        console.print(stage)

    mem = Table(title="memory (MiB, from /proc: VmHWM peak / VmRSS now)")
    mem.add_column("process")
    mem.add_column("peak (VmHWM)", justify="right")
    mem.add_column("rss at end", justify="right")
    for name, m in stack_memory.items():
        mem.add_row(name, fmt(m and m["peak_mib"], 0), fmt(m and m["rss_mib"], 0))
    for i, r in enumerate(runs):
        for phase in WORKER_PHASES:
            m = get(r, f"{phase}.memory_worker_final") or get(r, f"{phase}.memory_worker")
            if m:
                mem.add_row(f"worker ({phase}, run {i + 1})", fmt(m["peak_mib"], 0), fmt(m["rss_mib"], 0))
    console.print(mem)

    cpu = Table(title="CPU during each measured window (cores; the machine has "
                      f"{os.cpu_count()}; 'others' = processes that are not this benchmark's)")
    names = ["worker", "kafka", "redis", "milvus", "bench", "others", "machine"]
    cpu.add_column("window")
    for name in names:
        cpu.add_column(name, justify="right")
    cpu.add_column("seconds", justify="right")
    for i, r in enumerate(runs):
        for phase in WORKER_PHASES:
            c = get(r, f"{phase}.cpu_cores")
            if c:
                cpu.add_row(f"{phase}, run {i + 1}", *(fmt(c.get(n), 2) for n in names), fmt(c["window_s"], 1))
    if cpu.row_count:
        console.print(cpu)


def log_problems(runs: list[dict]) -> bool:
    logs = [get(r, f"{phase}.worker_log") for r in runs for phase in WORKER_PHASES]
    return any(log and (log["retries"] or log["tracebacks"] or log["errors"]) for log in logs)


def brief(phase: str, r: dict) -> str:
    if "error" in r:
        return "[red]failed[/]"
    if phase == "throughput":
        return f"{r['events_per_s']:,.0f} events/s applied, published at {r['publish_events_per_s']:,.0f}/s"
    if phase == "freshness":
        p = r["probes"]
        return f"probes p50 {p['p50_ms']:,.0f} ms, p99 {p['p99_ms']:,.0f} ms, max {p['max_ms']:,.0f} ms"
    if phase == "vectors":
        p = r["updates"]
        return f"updates p50 {p['p50_ms']:,.0f} ms, p99 {p['p99_ms']:,.0f} ms, max {p['max_ms']:,.0f} ms"
    if phase == "consume":
        p = r["probes"]
        return (f"no-op faust agent: {r['events_per_s']:,.0f} events/s; at {r['rate']:,.0f} ev/s probes p50 "
                f"{p['p50_ms']:,.0f} ms, p99 {p['p99_ms']:,.0f} ms")
    if phase == "stages":
        b, i = r.get("behaviour_batch", {}), r.get("index_batch", {})
        return (f"behaviour batch {b.get('total_ms', 0):,.0f} ms (Feast write {b.get('feast_write_ms', 0):,.0f}), "
                f"index batch {i.get('total_ms', 0):,.0f} ms (encode {i.get('encode_ms', 0):,.0f}, "
                f"upsert {i.get('milvus_upsert_ms', 0):,.0f})")
    return ""


def diagnose(runs: list[dict], summary: dict, verdict: dict) -> list[str]:
    """One line per target: the result and, for a miss, the stage that dominates."""
    lines = []

    def median(path):
        return summary.get(path, {}).get("median")

    def largest(block: str) -> str:
        stages = {k.removesuffix("_ms"): median(f"stages.{block}.{k}")
                  for k in (get(runs[0], f"stages.{block}") or {}) if k.endswith("_ms") and k != "total_ms"}
        stages = {k: v for k, v in stages.items() if v is not None}
        total = median(f"stages.{block}.total_ms")
        if not stages or not total:
            return "no stage timings (run the stages phase)"
        name = max(stages, key=stages.get)
        return f"largest in-process stage: {name} {stages[name]:,.0f} ms of {total:,.0f} ms per batch"

    v = verdict["throughput"]
    if v["value"] is not None:
        worker_ms = 500 / v["value"] * 1000
        in_proc = median("stages.behaviour_batch.total_ms")
        extra = (f"; the worker takes {worker_ms:,.0f} ms per 500 events vs {in_proc:,.0f} ms in-process, so "
                 f"{max(worker_ms - in_proc, 0):,.0f} ms go to consuming, faust and the flush timer") if in_proc else ""
        noop = median("consume.events_per_s")
        ceiling = (f"; a no-op faust agent (same app settings, decode only) consumes {noop:,.0f} events/s on this "
                   f"machine") if noop else ""
        lines.append(f"throughput {v['value']:,.0f} events/s: {'PASS' if v['pass'] else 'MISS'}; "
                     f"{largest('behaviour_batch')}{extra}{ceiling}")
    v = verdict["freshness"]
    if v["value"] is not None:
        kafka = [x for r in runs for x in [get(r, "freshness.kafka_delivery.p50_ms")] if x is not None]
        probe = summary.get("freshness.pooled", {}).get("p50_ms")
        split = (f"; of the probe p50 {probe:,.0f} ms, Kafka delivery to a consumer (fetch_max_wait_ms=1500 as faust "
                 f"sets it) is {statistics.median(kafka):,.0f} ms and the worker (batching, processing, Feast "
                 f"write) the other {probe - statistics.median(kafka):,.0f} ms") if kafka and probe else ""
        noop = summary.get("consume.pooled")
        floor = (f"; a no-op faust agent (same app settings, no Redis/Feast) already sees the same probes at p50 "
                 f"{noop['p50_ms']:,.0f} ms / p99 {noop['p99_ms']:,.0f} ms") if noop else ""
        lines.append(f"feature freshness p99 {v['value']:,.0f} ms: {'PASS' if v['pass'] else 'MISS'}{split}{floor}")
    v = verdict["vectors"]
    if v["value"] is not None:
        sustained = median("vectors.worker_updates_per_s")
        rate = get(runs[0], "vectors.rate") if runs else None
        keep_up = (f"; the worker sustained {sustained:,.1f} updates/s of {rate:,.0f} offered"
                   + (", so the backlog (and latency) grows with the run's length" if rate and sustained < 0.97 * rate
                      else "")) if sustained else ""
        lines.append(f"vector freshness p99 {v['value']:,.0f} ms: {'PASS' if v['pass'] else 'MISS'}{keep_up}; "
                     f"{largest('index_batch')}")
    for r in runs:
        for phase in WORKER_PHASES:
            log = get(r, f"{phase}.worker_log")
            if log and (log["retries"] or log["tracebacks"] or log["errors"] or log["overlapping_timers"]):
                lines.append(f"run {r['run']} {phase} worker log: {log['retries']} retries, {log['tracebacks']} "
                             f"tracebacks, {log['errors']} errors, {log['overlapping_timers']} 'timer is overlapping' "
                             f"warnings (the item-stats flush took longer than worker_flush_seconds) - {log['log']}")
    return lines


