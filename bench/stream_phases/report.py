"""The stream benchmark's report: the table of every run and the median, the pooled
freshness percentiles against the targets, where the in-process time goes, memory and CPU
per window, and the three targets with PASS/MISS, each naming the stage that limits it
(from the stages and consume phases and the CPU table)."""

from __future__ import annotations

import os
import statistics
from typing import Any

from rich.table import Table

from tailbridge.bench.common import console, fmt, get, latency_summary, pct

TARGETS = {
    "throughput": (">= 10,000 events/s into the online store", lambda v: v >= 10_000),
    "freshness": ("feature p99 <= 500 ms at 1,000 events/s", lambda v: v <= 500),
    "vectors": ("vector p99 <= 2 s at 50 updates/s", lambda v: v <= 2000),
}
CPU_KEYS = ("cpu_ms", "redis_cpu_ms")  # CPU per batch beside the wall-time stages
WORKER_PHASES = ("throughput", "freshness", "vectors", "consume")


# (label, path in a run's result, unit, digits, target key)
ROWS = [
    ("throughput: applied events/s (all workers joined)", "throughput.target_events_per_s", "", 0, "throughput"),
    ("throughput: applied events/s (first→last)", "throughput.events_per_s", "", 0, None),
    ("throughput: applied events/s (10%→90%)", "throughput.events_per_s_10_90", "", 0, None),
    ("throughput: events applied after all joined", "throughput.events_after_all_joined", "", 0, None),
    ("throughput: workers", "throughput.workers", "", 0, None),
    ("throughput: last worker joined after", "throughput.all_joined_after_s", " s", 1, None),
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
    ("freshness: after delivery p50 (worker)", "freshness.after_delivery.p50_ms", " ms", 0, None),
    ("freshness: after delivery p99 (worker)", "freshness.after_delivery.p99_ms", " ms", 0, None),
    ("freshness: Feast poll (get_online_features)", "freshness.poll_ms_median", " ms", 1, None),
    ("consume: no-op faust agent events/s (decode only)", "consume.events_per_s", "", 0, None),
    ("consume: no-op faust agent CPU per event", "consume.cpu_us_per_event", " µs", 0, None),
    ("consume: plain aiokafka batches events/s (decode only)", "consume.plain_aiokafka.events_per_s", "", 0, None),
    ("consume: plain aiokafka CPU per event", "consume.plain_aiokafka.cpu_us_per_event", " µs", 0, None),
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
    checks = {"throughput": summary.get("throughput.target_events_per_s", {}).get("median"),
              "freshness": summary.get("freshness.pooled", {}).get("p99_ms"),
              "vectors": summary.get("vectors.pooled", {}).get("p99_ms")}
    for key, value in checks.items():
        text, ok = TARGETS[key]
        out[key] = {"target_text": text, "value": value, "pass": None if value is None else bool(ok(value))}
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
    behaviour_batch = (get(runs[0], "stages.behaviour_batch.batch_size") or 0) if runs else 0
    for block, title in (("behaviour_batch", f"BehaviourProcessor.process, {behaviour_batch:,} events"),
                         ("index_batch", "Indexer.process, 50 items")):
        keys = [k for k in (get(runs[0], f"stages.{block}") or {}) if k.endswith("_ms") and k not in CPU_KEYS] \
            if runs else []
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
        for k, label in (("cpu_ms", "CPU of this process (ms)"), ("redis_cpu_ms", "CPU of redis-server (ms)")):
            s = summary.get(f"stages.{block}.{k}")
            if s:
                stage.add_row(f"  {label}", f"{s['median']:,.1f}", "", " / ".join(f"{v:,.1f}" for v in s["values"]))
        rate_key = "events_per_s_in_process" if block == "behaviour_batch" else "items_per_s_in_process"
        s = summary.get(f"stages.{block}.{rate_key}")
        if s:
            stage.add_row(f"  = {rate_key.replace('_', ' ')}", f"{s['median']:,.0f}", "", "")
    flush = [get(r, "stages.item_stats_flush") for r in runs if get(r, "stages.item_stats_flush")]
    if flush:
        stage.add_row("[bold]item-stats flush (1 per worker_flush_seconds)[/]", "", "", "")
        total = statistics.median(f["ms"] for f in flush)
        rows = statistics.median(f["feast_rows_ms"] for f in flush)
        stage.add_row("  feast_rows (encoding)", f"{rows:,.1f}", f"{100 * rows / total:.0f}%" if total else "",
                      " / ".join(f"{f['feast_rows_ms']:,.1f}" for f in flush))
        stage.add_row(f"  total ({flush[0]['items']} dirty items: Redis reads, rows, one write)", f"{total:,.1f}", "",
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
        return (f"{r['target_events_per_s']:,.0f} events/s applied by {r['workers']} worker(s) ({r['target_rate_basis']}), "
                f"published at {r['publish_events_per_s']:,.0f}/s")
    if phase == "freshness":
        p = r["probes"]
        return f"probes p50 {p['p50_ms']:,.0f} ms, p99 {p['p99_ms']:,.0f} ms, max {p['max_ms']:,.0f} ms"
    if phase == "vectors":
        p = r["updates"]
        return f"updates p50 {p['p50_ms']:,.0f} ms, p99 {p['p99_ms']:,.0f} ms, max {p['max_ms']:,.0f} ms"
    if phase == "consume":
        p = r["probes"]
        return (f"no-op faust agent: {r['events_per_s']:,.0f} events/s ({r['cpu_us_per_event']:,.0f} µs CPU each), "
                f"plain aiokafka {r['plain_aiokafka']['events_per_s']:,.0f}/s; at {r['rate']:,.0f} ev/s probes p50 "
                f"{p['p50_ms']:,.0f} ms, p99 {p['p99_ms']:,.0f} ms")
    if phase == "stages":
        b, i = r.get("behaviour_batch", {}), r.get("index_batch", {})
        return (f"behaviour batch {b.get('total_ms', 0):,.0f} ms (fold {b.get('fold_ms', 0):,.0f}, Redis write "
                f"{b.get('redis_write_ms', 0):,.0f}), "
                f"index batch {i.get('total_ms', 0):,.0f} ms (encode {i.get('encode_ms', 0):,.0f}, "
                f"upsert {i.get('milvus_upsert_ms', 0):,.0f})")
    return ""


def diagnose(runs: list[dict], summary: dict, verdict: dict, cpus: int) -> list[dict]:
    """Per target: its value, PASS/MISS and what limits it, from the stages and consume phases
    and the CPU each window used (medians across runs)."""

    def median(path):
        return summary.get(path, {}).get("median")

    def cpu(phase: str, name: str) -> float | None:
        values = [c[name] for r in runs if (c := get(r, f"{phase}.cpu_cores")) and name in c]
        return statistics.median(values) if values else None

    def largest(block: str) -> str:
        stages = {k.removesuffix("_ms"): median(f"stages.{block}.{k}") for k in (get(runs[0], f"stages.{block}") or {})
                  if k.endswith("_ms") and k != "total_ms" and k not in CPU_KEYS}
        stages = {k: v for k, v in stages.items() if v is not None}
        total = median(f"stages.{block}.total_ms")
        if not stages or not total:
            return "no stage timings (run the stages phase)"
        name = max(stages, key=stages.get)
        return f"largest in-process stage {name}: {stages[name]:,.0f} of {total:,.0f} ms per batch"

    def machine(phase: str) -> str:
        busy, others = cpu(phase, "machine"), cpu(phase, "others")
        return "" if busy is None else f" (machine busy {busy:.2f} of {cpus} cores, {others:.2f} by others)"

    out = []
    v = verdict["throughput"]
    if v["value"] is not None:
        rate, workers = v["value"], get(runs[0], "throughput.workers") or 1
        per_event = {name: cores / rate * 1e6 for name in ("worker", "kafka", "redis")
                     if (cores := cpu("throughput", name)) is not None}
        faust, plain = median("consume.cpu_us_per_event"), median("consume.plain_aiokafka.cpu_us_per_event")
        processing, decode = median("stages.behaviour_batch.cpu_us_per_event"), median("stages.behaviour_batch.decode_ms")
        batch = median("stages.behaviour_batch.batch_size") or 1
        parts = {}
        if plain is not None:  # the worker reads the behaviour topics in batches (streams.batch_consumer)
            parts["the batch consumer's fetch and decode (plain aiokafka getmany, decode included)"] = plain
        if processing is not None:
            parts["the behaviour processor (fold, Feast rows, Redis)"] = processing - (decode or 0) * 1000 / batch
        why = ""
        if "worker" in per_event:
            spent = sum(per_event.values())
            why = (f"; CPU per applied event: worker {per_event['worker']:,.0f} µs, broker {per_event.get('kafka', 0):,.0f}, "
                   f"redis {per_event.get('redis', 0):,.0f}: {cpus} cores carry at most {cpus / spent * 1e6:,.0f} events/s")
        if parts:
            name = max(parts, key=parts.get)
            why += (f"; of the worker's, {name} is the largest: {parts[name]:,.0f} µs"
                    + (f" (faust's per-message delivery, which the worker no longer uses for these topics, "
                       f"costs {faust:,.0f} µs)" if faust else ""))
        out.append({"target": "throughput", **v, "limit": f"{workers} worker(s){machine('throughput')}{why}"})
    v = verdict["freshness"]
    if v["value"] is not None:
        kafka = [x for r in runs if (x := get(r, "freshness.kafka_delivery.p99_ms")) is not None]
        worker = [x for r in runs if (x := get(r, "freshness.after_delivery.p99_ms")) is not None]
        why = ""
        if kafka and worker:
            k, w = statistics.median(kafka), statistics.median(worker)
            name = "Kafka delivery (worker_fetch_wait_ms)" if k >= w else \
                "the worker after delivery (the batch handed over, the Redis transaction, the event loop's share of the CPU)"
            why = f"; p99 of the parts: Kafka delivery {k:,.0f} ms, worker after delivery {w:,.0f} ms: {name} limits"
        noop = summary.get("consume.pooled")
        if noop:
            why += f"; a no-op faust agent sees the same probes at p99 {noop['p99_ms']:,.0f} ms"
        out.append({"target": "freshness", **v, "limit": f"{machine('freshness').strip(' ()')}{why}".lstrip("; ")})
    v = verdict["vectors"]
    if v["value"] is not None:
        sustained, rate = median("vectors.worker_updates_per_s"), get(runs[0], "vectors.rate")
        keeps_up = sustained is None or rate is None or sustained >= 0.97 * rate
        why = (f"the worker sustained {sustained:,.1f} of {rate:,.0f} updates/s offered"
               + ("" if keeps_up else ", so the backlog (and latency) grows with the run") if sustained else "")
        in_process = median("stages.index_batch.items_per_s_in_process")
        if in_process:
            why += f"; in-process {in_process:,.0f} items/s, {largest('index_batch')}"
        out.append({"target": "vectors", **v, "limit": f"{why}{machine('vectors')}"})
    return out


def print_targets(diagnosis: list[dict], runs: list[dict]) -> None:
    table = Table(title="targets (medians of the runs; pooled p99 over every probe)", show_lines=True)
    for column in ("target", "value", "", "what limits it"):
        table.add_column(column, overflow="fold")
    units = {"throughput": " events/s", "freshness": " ms", "vectors": " ms"}
    for d in diagnosis:
        table.add_row(d["target"] + ": " + d["target_text"], fmt(d["value"], 0, units[d["target"]]), verdict_cell(d),
                      d["limit"])
    console.print(table)
    for r in runs:
        for phase in WORKER_PHASES:
            log = get(r, f"{phase}.worker_log")
            if log and (log["retries"] or log["tracebacks"] or log["errors"] or log["overlapping_timers"]):
                console.print(f"run {r['run']} {phase} worker log: {log['retries']} retries, {log['tracebacks']} "
                              f"tracebacks, {log['errors']} errors, {log['overlapping_timers']} 'timer is overlapping' "
                              f"warnings (a periodic job took longer than its period) - {log['log']}")
