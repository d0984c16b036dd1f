"""Benchmark of the query handler (`tailbridge serve`) under fixed-rate load on loopback.

    .venv/bin/python -m tailbridge.bench.serving --prepare --data DIR [--items 50000] [--events 20000]
                                                 [--retriever-minutes 4]
    .venv/bin/python -m tailbridge.bench.serving --url http://127.0.0.1:8000 --data DIR [--rates 20,50,100]
                                                 [--duration 30] [--runs 3] [--json out.json]
    .venv/bin/python -m tailbridge.bench.serving --smoke [--json out.json]

Both read the same TAILBRIDGE_* settings as the app (run them with the app's environment):
the Milvus URI and topic prefix (which collection the direct searches go to) and the candidate
count per route (``serve_candidates``, the ``limit`` of every engine call).

``--prepare`` builds what the measurement needs, on whatever stack the settings point at:
a demo catalog (``tailbridge data synth``), the topics and Feast views, a ``tailbridge
worker`` (started detached and left running, unless ``--no-worker``), the catalog published and
indexed by that worker (progress from the Milvus row count), simulated shopper sessions
replayed so the personas have a real-time ``user_context``, then the unified retriever trained
on the data within ``--retriever-minutes`` (``tailbridge train retriever``; reused once
written) and serving moved to it (``tailbridge reindex``). Steps already done for this
namespace are skipped (a marker file in DIR), so it can be re-run after an interruption.

The measurement: first the user-context read three ways under bursts of 50 concurrent reads
(straight from Feast's Redis rows on an async client, as the handler reads it; Feast's
``get_online_features_async``; Feast's sync read on 4 threads, as the handler read it before).
Then per rate (20, 50 and 100 requests/s by default) and per run:

1. handler    - open-loop load: POST /search is sent at fixed intervals whatever the answers
                (asyncio + httpx), each with ``explain=true`` (so the answer carries per-stage
                timings) and the user id of a shopper that has a user_context (from GET /users),
                the query drawn from the demo queries (head, torso and tail mixed). Latency is
                measured from the *scheduled* send time, so queueing anywhere (client, server,
                engine) is counted and not hidden by coordinated omission. After a warm-up.
2. bare engine - the same searches, at the same rate, sent straight to the engine with the
                handler's own calls (``serving.index.ServingIndex``: the dense search beside the
                lexical one, same collection, limit and output fields), query vectors computed
                beforehand: the engine alone, in the same run.

It reports p50/p95/p99 of end-to-end latency and of every stage, the handler's overhead per
request (end to end minus its ``retrieve`` stage, the engine on the search's critical path),
the bare engine's latency, errors, degraded answers, the personalised share, the achieved rate
and the CPU each process used; medians over the runs, and PASS/MISS of the targets at 50
requests/s: e2e p99 <= 50 ms, 0 errors, >= 99% of searches with a user personalised, handler
overhead p50 <= 1.3 x the bare engine's p50.

``--smoke`` does it all at tiny sizes in about a minute on the stack the settings point at
(a 150-item catalog, MiniLM, a worker, the app on a free port, 3 s at 5 requests/s), then
stops the worker and the app: it checks that the benchmark works, its numbers are no
measurement. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from rich.table import Table

from tailbridge.bench.common import (CLI, BenchError, CpuWindow, Worker, cmdline, console, exit_on_sigterm, fmt,
                                     free_port, get, latency_summary, listening_pid, loadavg_text, progress_bar,
                                     run_meta, settings_env, stack_pids, stack_status, wait_until, write_json)
from tailbridge.settings import Settings
from tailbridge.streams.term_index import TermFilters

# The handler's stages (serving.search); the first six overlap: lexical_query runs beside the
# context and rewrite reads, dense beside lexical_rewrites. ``retrieve`` is the engine on the
# critical path (from the embedding to the last route back).
STAGES = ["user_context", "rewrites", "lexical_query", "embed", "dense", "lexical_rewrites", "retrieve", "fuse",
          "item_stats", "rank", "publish", "total"]
TARGET_RATE = 50.0
TARGETS = {
    "p99": (f"e2e p99 <= 50 ms at {TARGET_RATE:g} QPS", 50.0),
    "errors": (f"0 errors at {TARGET_RATE:g} QPS", 0.0),
    "personalized": (f">= 99% of searches with a user personalised at {TARGET_RATE:g} QPS", 0.99),
    "overhead": (f"handler overhead (e2e - engine) p50 <= 1.3 x bare engine p50 at {TARGET_RATE:g} QPS", 1.3),
}


def namespace_workers(settings: Settings) -> list[int]:
    """`tailbridge worker` processes serving this namespace (their TAILBRIDGE_TOPIC_PREFIX)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if not any(a.endswith("tailbridge") for a in argv[:2]) or "worker" not in argv[1:3]:
            continue
        try:
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text(errors="replace").split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("TAILBRIDGE_TOPIC_PREFIX", "tailbridge") == settings.topic_prefix:
            found.append(int(entry.name))
    return sorted(found)


# ------------------------------------------------------------------ the request plan


@dataclass
class Plan:
    queries: list[str]  # one per request, in send order
    strata: list[str]
    users: list[str | None]


def load_queries(data: Path) -> dict[str, list[str]]:
    by_stratum: dict[str, list[str]] = {}
    path = data / "queries.jsonl"
    if not path.is_file():
        raise BenchError(f"no {path}: --data must be a demo data dir (`tailbridge data synth --out DIR`)")
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                q = orjson.loads(line)
                by_stratum.setdefault(q["metadata"]["stratum"], []).append(q["text"])
    return by_stratum


def make_plan(by_stratum: dict[str, list[str]], mix: dict[str, float], users: list[str], n: int, seed: int) -> Plan:
    rng = random.Random(seed)
    strata = [s for s in mix if by_stratum.get(s)]
    if not strata:
        raise BenchError(f"no queries of strata {list(mix)} in the data dir")
    weights = [mix[s] for s in strata]
    plan = Plan([], [], [])
    for _ in range(n):
        stratum = rng.choices(strata, weights)[0]
        plan.strata.append(stratum)
        plan.queries.append(rng.choice(by_stratum[stratum]))
        plan.users.append(rng.choice(users) if users else None)
    return plan


# ------------------------------------------------------------------ open-loop load


async def open_loop(rate: float, count: int, fire) -> list[dict]:
    """Start request i at t0 + i/rate whatever happened to the earlier ones; each record's
    latency is from its scheduled time."""
    t0 = time.perf_counter() + 0.05
    tasks = []
    for i in range(count):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(i, at)))
    sent_span = time.perf_counter() - t0
    records = await asyncio.gather(*tasks)
    for r in records:  # the rate actually sent (the dispatcher may fall behind on a busy machine)
        r["_sent_per_s"] = (count - 1) / sent_span if count > 1 and sent_span > 0 else None
    return records


async def handler_phase(url: str, plan: Plan, offset: int, rate: float, count: int, k: int,
                        timeout_s: float) -> list[dict]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        async def fire(i: int, at: float) -> dict:
            j = (offset + i) % len(plan.queries)
            body = {"query": plan.queries[j], "k": k, "explain": True}
            if plan.users[j]:
                body["user_id"] = plan.users[j]
                body["session_id"] = f"bench-{plan.users[j]}"
            started = time.perf_counter()
            record: dict[str, Any] = {"i": i, "stratum": plan.strata[j], "lag_ms": (started - at) * 1000}
            try:
                response = await client.post("/search", json=body)
                done = time.perf_counter()
                record.update(status=response.status_code, e2e_ms=(done - at) * 1000,
                              service_ms=(done - started) * 1000)
                if response.status_code == 200:
                    answer = response.json()
                    record.update(timings=answer.get("timings_ms") or {}, degraded=answer["degraded"],
                                  personalized=answer["personalized"], user=bool(plan.users[j]),
                                  results=len(answer["results"]), versions=answer["model_versions"])
                else:
                    record["error"] = response.text[:300]
            except httpx.HTTPError as exc:
                record.update(status=0, e2e_ms=(time.perf_counter() - at) * 1000, error=f"{type(exc).__name__}: {exc}")
            return record

        return await open_loop(rate, count, fire)


async def engine_search(index, serving, vector: np.ndarray, text: str, limit: int) -> None:
    """The handler's own engine calls for one search, as it makes them: the dense search of the
    query vector beside the lexical search of its text (serving.index)."""
    await asyncio.gather(index.dense(serving, vector[None, :], limit, ""),
                         index.lexical(serving, [text], limit, "", TermFilters()))


async def direct_phase(index, serving, vectors: dict[str, np.ndarray], plan: Plan, offset: int, rate: float,
                       count: int, limit: int) -> list[dict]:
    async def fire(i: int, at: float) -> dict:
        j = (offset + i) % len(plan.queries)
        text = plan.queries[j]
        started = time.perf_counter()
        record: dict[str, Any] = {"i": i, "lag_ms": (started - at) * 1000}
        try:
            await engine_search(index, serving, vectors[text], text, limit)
            record.update(status=200, e2e_ms=(time.perf_counter() - at) * 1000)
        except Exception as exc:  # noqa: BLE001  counted as an error of the phase
            record.update(status=0, e2e_ms=(time.perf_counter() - at) * 1000, error=f"{type(exc).__name__}: {exc}")
        return record

    return await open_loop(rate, count, fire)


def run_with_progress(what: str, seconds: float, coroutine):
    """Run a phase on this thread's event loop with a progress bar advancing on wall time."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # noqa: BLE001  re-raised below
            result["error"] = exc

    thread = threading.Thread(target=target, name=what, daemon=True)
    started = time.monotonic()
    with progress_bar() as progress:
        task = progress.add_task(what, total=round(seconds), info="")
        thread.start()
        while thread.is_alive():
            thread.join(0.25)
            progress.update(task, completed=min(round(time.monotonic() - started), round(seconds)))
    if "error" in result:
        raise result["error"]
    return result["value"]


class Settler:
    """Waits, between phases, until one direct search is about as fast as before the first:
    an overloaded engine keeps working off searches whose clients gave up, and the next
    phase must not inherit that backlog."""

    def __init__(self, index, serving, vector: np.ndarray, text: str, limit: int):
        self.index, self.serving, self.vector, self.text, self.limit = index, serving, vector, text, limit
        self.baseline_ms = statistics.median(self.probe() for _ in range(5))

    def probe(self) -> float:
        started = time.perf_counter()
        try:
            asyncio.run(engine_search(self.index, self.serving, self.vector, self.text, self.limit))
        except Exception:  # noqa: BLE001  still overloaded
            return float("inf")
        return (time.perf_counter() - started) * 1000

    def wait(self, max_s: float = 180.0) -> float:
        started = time.monotonic()
        with console.status("waiting for the engine to work off its backlog"):
            while time.monotonic() - started < max_s:
                if self.probe() <= 2 * self.baseline_ms + 20:
                    break
                time.sleep(1.0)
        return round(time.monotonic() - started, 1)


# ------------------------------------------------------------------ one measurement


def analyse_handler(records: list[dict], rate: float) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    errors = Counter(str(r.get("status")) for r in records if r.get("status") != 200)
    out: dict[str, Any] = {
        "target_rate": rate, "requests": len(records), "ok": len(ok), "errors": dict(errors),
        "error_examples": list({str(r.get("status")): r["error"] for r in reversed(records) if r.get("error")}.values()),
        "sent_per_s": records[0]["_sent_per_s"] if records else None,
        "e2e": latency_summary([r["e2e_ms"] for r in records if "e2e_ms" in r]),
        "e2e_ok": latency_summary([r["e2e_ms"] for r in ok]),
        "service": latency_summary([r["service_ms"] for r in ok]),
        "dispatch_lag": latency_summary([r["lag_ms"] for r in records]),
        "stages": {s: latency_summary([r["timings"][s] for r in ok if s in r["timings"]]) for s in STAGES
                   if any(s in r["timings"] for r in ok)},
        # Everything but the two Milvus calls: end to end (from the scheduled send) minus the
        # handler's retrieve stage; and the same inside the handler (its total minus retrieve).
        "overhead": latency_summary([r["e2e_ms"] - r["timings"]["retrieve"] for r in ok if "retrieve" in r["timings"]]),
        "overhead_in_handler": latency_summary([r["timings"]["total"] - r["timings"]["retrieve"] for r in ok
                                        if "retrieve" in r["timings"]]),
        "degraded": dict(Counter(d for r in ok for d in r["degraded"])),
        "degraded_requests": sum(1 for r in ok if r["degraded"]),
        "with_user": sum(1 for r in ok if r["user"]),
        "personalized": sum(1 for r in ok if r["personalized"]),
        "empty_results": sum(1 for r in ok if not r["results"]),
        "by_stratum": {s: latency_summary([r["e2e_ms"] for r in ok if r["stratum"] == s])
                       for s in sorted({r["stratum"] for r in ok})},
        "model_versions": ok[-1]["versions"] if ok else None,
        "latencies_ms": [round(r["e2e_ms"], 2) for r in records if "e2e_ms" in r],
        "retrieve_ms": [round(r["timings"].get("retrieve", float("nan")), 2) for r in ok],
    }
    out["personalized_fraction"] = out["personalized"] / out["with_user"] if out["with_user"] else None
    out.update(trend(records))
    failed = sum(out["errors"].values())
    out["overloaded"] = bool(out.get("overloaded")) or failed > 0.05 * max(len(records), 1)
    return out


def trend(records: list[dict]) -> dict:
    """Open loop, so a rate the system cannot sustain shows as latency that keeps growing through
    the window (a queue building up) rather than as a lower rate: compare the thirds. (More than
    5 % errors also counts as overloaded: the deadlines cut the queue short.)"""
    lat = [r["e2e_ms"] for r in sorted(records, key=lambda r: r["i"]) if "e2e_ms" in r]
    if len(lat) < 30:
        return {}
    third = len(lat) // 3
    first, last = statistics.median(lat[:third]), statistics.median(lat[-third:])
    return {"p50_first_third_ms": first, "p50_last_third_ms": last, "overloaded": last > 2 * first + 50}


def analyse_direct(records: list[dict], rate: float) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    shape = trend(records)
    shape["overloaded"] = bool(shape.get("overloaded")) or len(records) - len(ok) > 0.05 * max(len(records), 1)
    return {"target_rate": rate, "requests": len(records), "ok": len(ok), **shape,
            "errors": len(records) - len(ok), "error_examples": [r["error"] for r in records if r.get("error")][:3],
            "sent_per_s": records[0]["_sent_per_s"] if records else None,
            "e2e": latency_summary([r["e2e_ms"] for r in ok]), "dispatch_lag": latency_summary([r["lag_ms"] for r in records]),
            "latencies_ms": [round(r["e2e_ms"], 2) for r in ok]}


def measure_rate(args, plan: Plan, index, serving, vectors, limit: int, rate: float, run: int, pids: dict,
                 settler: Settler) -> dict:
    count, warm = int(rate * args.duration), int(rate * args.warmup)
    offset = (run * 7919 + int(rate) * 104729) % len(plan.queries)  # each run and rate: other searches
    result: dict[str, Any] = {"rate": rate, "settle_before_s": settler.wait()}
    if warm:
        run_with_progress(f"run {run + 1}: warm-up {rate:g}/s", args.warmup,
                          handler_phase(args.url, plan, offset + count, rate, warm, args.k, args.timeout))
    cpu = CpuWindow(pids, top_others=4)
    records = run_with_progress(f"run {run + 1}: handler {rate:g}/s", args.duration,
                                handler_phase(args.url, plan, offset, rate, count, args.k, args.timeout))
    result["handler"] = analyse_handler(records, rate)
    result["handler"]["cpu_cores"] = cpu.stop()
    if not args.no_direct:
        result["settle_before_direct_s"] = settler.wait()
        run_with_progress(f"run {run + 1}: direct warm-up {rate:g}/s", min(args.warmup, 3),
                          direct_phase(index, serving, vectors, plan, offset + count, rate,
                                       int(rate * min(args.warmup, 3)), limit))
        cpu = CpuWindow(pids, top_others=4)
        records = run_with_progress(f"run {run + 1}: bare engine {rate:g}/s", args.duration,
                                    direct_phase(index, serving, vectors, plan, offset, rate, count, limit))
        result["direct"] = analyse_direct(records, rate)
        result["direct"]["cpu_cores"] = cpu.stop()
    h, d = result["handler"], result.get("direct")
    console.print(f"  {rate:g}/s: e2e p50 {fmt(h['e2e']['p50_ms'])} p95 {fmt(h['e2e']['p95_ms'])} p99 "
                  f"{fmt(h['e2e']['p99_ms'])} ms; overhead p50 {fmt(h['overhead']['p50_ms'])} ms"
                  + (f"; bare engine p50 {fmt(d['e2e']['p50_ms'])} p99 {fmt(d['e2e']['p99_ms'])} ms" if d else "")
                  + f"; errors {sum(h['errors'].values())}, personalised {h['personalized']}/{h['with_user']}"
                  + "".join(f"; [red]{name} OVERLOADED[/] (p50 {x.get('p50_first_third_ms', 0):,.0f} ms in the first "
                            f"third of the window, {x.get('p50_last_third_ms', 0):,.0f} ms in the last; "
                            f"{x['requests'] - x['ok']} failed)"
                            for name, x in (("handler", h), ("bare engine", d or {})) if x.get("overloaded")))
    return result


# ------------------------------------------------------------------ reporting

ROWS = [  # (label, path under a rate's result)
    ("end to end (from scheduled send)", "handler.e2e"),
    ("  handler total (server side)", "handler.stages.total"),
    *[(f"  stage: {s}", f"handler.stages.{s}") for s in STAGES[:-1]],
    ("handler overhead = e2e - retrieve", "handler.overhead"),
    ("  in handler = total - retrieve", "handler.overhead_in_handler"),
    ("bare engine (dense | lexical, concurrent)", "direct.e2e"),
    ("client dispatch lag (bench)", "handler.dispatch_lag"),
]


def median_of(runs: list[dict], rate: float, path: str) -> float | None:
    values = [v for r in runs for x in r["rates"] if x["rate"] == rate
              if isinstance(v := get(x, path), (int, float))]
    return statistics.median(values) if values else None


def rate_blocks(runs: list[dict], rate: float) -> list[dict]:
    return [x for r in runs for x in r["rates"] if x["rate"] == rate]


def summarise(runs: list[dict], rates: list[float]) -> dict:
    out: dict[str, Any] = {}
    for rate in rates:
        block: dict[str, Any] = {}
        for _, path in ROWS:
            for q in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
                value = median_of(runs, rate, f"{path}.{q}")
                if value is not None:
                    block[f"{path}.{q}"] = value
        for path in ("handler.sent_per_s", "handler.personalized_fraction", "handler.degraded_requests",
                     "handler.ok", "handler.requests", "direct.sent_per_s"):
            block[path] = median_of(runs, rate, path)
        # Pooled over runs: the per-request arrays.
        e2e = [v for r in runs for x in r["rates"] if x["rate"] == rate for v in get(x, "handler.latencies_ms") or []]
        direct = [v for r in runs for x in r["rates"] if x["rate"] == rate for v in get(x, "direct.latencies_ms") or []]
        block["pooled.e2e"] = latency_summary(e2e)
        block["pooled.direct"] = latency_summary(direct)
        out[str(rate)] = block
    return out


def verdicts(summary_: dict) -> dict:
    """PASS/MISS of each target on the medians of the runs at TARGET_RATE (n/a if not measured)."""
    block = summary_.get(str(TARGET_RATE), {})
    errors = None if block.get("handler.requests") is None else block["handler.requests"] - block["handler.ok"]
    engine = block.get("direct.e2e.p50_ms")
    overhead = block.get("handler.overhead.p50_ms")
    values = {"p99": block.get("handler.e2e.p99_ms"), "errors": errors,
              "personalized": block.get("handler.personalized_fraction"),
              "overhead": overhead / engine if overhead is not None and engine else None}
    checks = {"p99": lambda v, t: v <= t, "errors": lambda v, t: v <= t, "personalized": lambda v, t: v >= t,
              "overhead": lambda v, t: v <= t}
    return {name: {"target": TARGETS[name][0], "value": value,
                   "pass": None if value is None else checks[name](value, TARGETS[name][1])}
            for name, value in values.items()}


def print_results(runs: list[dict], rates: list[float], summary_: dict, verdict: dict) -> None:
    for rate in rates:
        n = len(runs)
        table = Table(title=f"{rate:g} requests/s: latency in ms (median of {n} run{'s' if n > 1 else ''})")
        table.add_column("what")
        for q in ("p50", "p95", "p99", "max"):
            table.add_column(q, justify="right")
        if n > 1:
            table.add_column("per run p50 / p99", justify="right")
        for label, path in ROWS:
            values = [summary_[str(rate)].get(f"{path}.{q}_ms") for q in ("p50", "p95", "p99", "max")]
            if all(v is None for v in values):
                continue
            row = [label, *(fmt(v) for v in values)]
            if n > 1:
                row.append("  ".join(f"{fmt(get(x, path + '.p50_ms'))}/{fmt(get(x, path + '.p99_ms'))}"
                                     for x in rate_blocks(runs, rate)))
            table.add_row(*row)
        console.print(table)
        block = summary_[str(rate)]
        frac = block["handler.personalized_fraction"]
        console.print(f"  sent {fmt(block['handler.sent_per_s'])} req/s (target {rate:g}); "
                      f"ok {fmt(block['handler.ok'], 0)} of {fmt(block['handler.requests'], 0)} per run; "
                      f"degraded answers {fmt(block['handler.degraded_requests'], 0)}; personalised "
                      f"{'-' if frac is None else f'{100 * frac:.1f}%'} of requests with a user id")
        for phase in ("handler", "direct"):
            over = [i + 1 for i, x in enumerate(rate_blocks(runs, rate)) if get(x, f"{phase}.overloaded")]
            if over:
                console.print(f"  [red]{phase} overloaded[/] in run(s) {over}: latency grew through the window or over "
                              "5 % failed, so these percentiles measure a growing queue (and the window length) and "
                              "the deadlines, not a steady state")
        direct50, direct99 = block.get("direct.e2e.p50_ms"), block.get("direct.e2e.p99_ms")
        e2e50, e2e99 = block.get("handler.e2e.p50_ms"), block.get("handler.e2e.p99_ms")
        if direct50 is not None and e2e50 is not None:
            console.print(f"  end to end vs the same searches straight to the engine: p50 {e2e50:,.1f} vs {direct50:,.1f} ms "
                          f"(+{e2e50 - direct50:,.1f}), p99 {e2e99:,.1f} vs {direct99:,.1f} ms (+{e2e99 - direct99:,.1f})")
        for i, x in enumerate(rate_blocks(runs, rate)):
            h = x["handler"]
            if h["errors"] or h["degraded"]:
                console.print(f"  run {i + 1}: errors {h['errors']} {h['error_examples'][:1]}; degraded {h['degraded']}")

    cpu = Table(title=f"CPU during each measured window (cores; the machine has {os.cpu_count()}; "
                      "'others' = processes not named here)")
    names = sorted({k for r in runs for x in r["rates"] for phase in ("handler", "direct")
                    for k in (get(x, f"{phase}.cpu_cores") or {})
                    if k not in ("machine", "others", "window_s", "top_others")})
    cpu.add_column("window")
    for name in [*names, "others", "machine"]:
        cpu.add_column(name, justify="right")
    for i, r in enumerate(runs):
        for x in r["rates"]:
            for phase in ("handler", "direct"):
                c = get(x, f"{phase}.cpu_cores")
                if c:
                    cpu.add_row(f"run {i + 1} {x['rate']:g}/s {phase}", *(fmt(c.get(n), 2) for n in [*names, "others", "machine"]))
    console.print(cpu)
    beside = Counter(line.split(" ", 1)[1] for r in runs for x in r["rates"] for phase in ("handler", "direct")
                     for line in get(x, f"{phase}.cpu_cores.top_others") or [])
    if beside:
        console.print("  busiest other processes during the windows: "
                      + "; ".join(f"{name} ({n} windows)" for name, n in beside.most_common(4)))

    t = Table(title="targets")
    for column in ("target", "value", ""):
        t.add_column(column)
    units = {"p99": " ms", "errors": "", "personalized": "", "overhead": " x"}
    for name, v in verdict.items():
        cell = "[yellow]n/a[/]" if v["pass"] is None else "[green]PASS[/]" if v["pass"] else "[red]MISS[/]"
        t.add_row(v["target"], fmt(v["value"], 3 if name == "personalized" else 1, units[name]), cell)
    console.print(t)


def diagnose(runs: list[dict], rates: list[float], summary_: dict) -> list[str]:
    lines = []
    for rate in rates:
        block = summary_[str(rate)]
        stages = {s: block.get(f"handler.stages.{s}.p50_ms") for s in STAGES[:-1]}
        stages = {s: v for s, v in stages.items() if v is not None}
        total = block.get("handler.stages.total.p50_ms")
        e2e50, e2e99 = block.get("handler.e2e.p50_ms"), block.get("handler.e2e.p99_ms")
        if not stages or not total:
            continue
        top = sorted(stages, key=stages.get, reverse=True)[:2]
        parts = ", ".join(f"{s} {stages[s]:.1f} ms" for s in top)
        line = f"{rate:g}/s: of the handler's p50 {total:.1f} ms, the largest stages are {parts}"
        direct = block.get("direct.e2e.p50_ms")
        if direct is not None and "retrieve" in stages:
            line += (f"; retrieve inside the handler {stages['retrieve']:.1f} ms vs the same Milvus calls alone "
                     f"{direct:.1f} ms")
        if e2e50 is not None:
            line += f"; outside the handler (HTTP, queueing) p50 {e2e50 - total:.1f} ms"
        stages99 = {s: block.get(f"handler.stages.{s}.p99_ms") for s in STAGES[:-1]}
        stages99 = {s: v for s, v in stages99.items() if v is not None}
        if stages99 and e2e99:
            worst = max(stages99, key=stages99.get)
            line += f"; at p99 ({e2e99:.0f} ms end to end) the slowest stage is {worst} ({stages99[worst]:.0f} ms)"
        lines.append(line)
    return lines


# ------------------------------------------------------------------ prepare


def cli(settings: Settings, *args: str) -> None:
    console.print(f"[dim]$ tailbridge {' '.join(args)}[/]")
    subprocess.run([CLI, *args], check=True, env=settings_env(settings))


def prepare(args, poll_s: float = 5.0, beside: Worker | None = None) -> Worker | None:
    """Build the demo catalog setup for the measurement on the stack the settings point at.
    Returns the worker it started (left running when the command ends), or None. ``beside``
    is started as soon as the worker is (the smoke run's app: its start-up overlaps indexing)."""
    import itertools

    import redis

    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.feature_repo.store import apply, feature_store
    from tailbridge.streams import item_index
    from tailbridge.streams.behaviour import Keys
    from tailbridge.streams.topics import create_topics
    from tailbridge.synthetic import catalog as synth
    from tailbridge.synthetic.replay import publish
    from tailbridge.synthetic.shoppers import catalog_events, simulate

    settings = Settings()
    data: Path = args.data
    marker_path = data / f".bench-serving-{settings.topic_prefix}.json"
    if not (data / "manifest.json").is_file():
        cli(settings, "data", "synth", "--items", str(args.items), "--users", str(args.users), "--out", str(data))
    marker = orjson.loads(marker_path.read_bytes()) if marker_path.is_file() and not args.force else {}
    with console.status("topics and Feast views (as `tailbridge topics create` and `tailbridge features apply`)"):
        create_topics(settings)
        apply(feature_store(settings))
    dataset = synth.load(data)
    items = len(dataset.items)
    console.print(f"data {data}: {items:,} items, {len(dataset.users)} personas, {len(dataset.queries):,} queries; "
                  f"namespace {settings.topic_prefix!r} / Feast project {settings.feast_project!r}; "
                  f"Milvus {settings.milvus_uri}")

    worker = None
    if not args.no_worker:
        # All the machine's cores for the encoder: indexing 50,000 items is the long step.
        worker = Worker(settings, data / f"worker-{settings.topic_prefix}.log", threads=None)
        worker.start()
        console.print(f"started `tailbridge worker` (pid {worker.pid}, log {worker.log_path}); it is left running")
    if beside is not None:
        beside.start()

    def worker_alive() -> None:
        if worker is not None:
            worker.check_alive()

    milvus = item_index.connect(settings)

    def indexed() -> int:
        try:
            return item_index.count(milvus, item_index.alias_name(settings)) \
                if item_index.serving_collection(milvus, settings) else 0
        except Exception:  # noqa: BLE001  the collection is being created
            return 0

    def save() -> None:
        marker_path.write_bytes(orjson.dumps(marker, option=orjson.OPT_INDENT_2))

    if indexed() < items and not marker.get("catalog_published"):
        with progress_bar() as progress:
            task = progress.add_task("publishing the catalog", total=items, info="")
            report = publish(settings, catalog_events(dataset), on_sent=lambda e: progress.advance(task))
        if report.failed or report.errors:
            raise BenchError(f"catalog publish failed: {report.errors[:3]}")
        marker["catalog_published"] = datetime.now(UTC).isoformat()
        save()
    else:
        console.print("catalog already published to this namespace; waiting for the index")

    # 50k MiniLM encodes take a while on 2 cores: show the count, the rate and the time left.
    started, last, last_change = time.monotonic(), indexed(), time.monotonic()
    first = last
    with progress_bar() as progress:
        task = progress.add_task("worker indexing (Milvus rows)", total=items, completed=last, info="")
        while last < items:
            time.sleep(poll_s)
            worker_alive()
            now_count, now = indexed(), time.monotonic()
            if now_count != last:
                last, last_change = now_count, now
            elif now - last_change > args.stall_timeout:
                where = worker.log_path if worker else "its log"
                raise BenchError(f"indexing stuck at {last:,} of {items:,} rows for {args.stall_timeout:.0f} s "
                                 f"(is a `tailbridge worker` running for this namespace? see {where})")
            rate = (last - first) / max(now - started, 1e-9)
            eta = f", ~{(items - last) / rate / 60:.0f} min left" if rate > 0 else ""
            progress.update(task, completed=last, info=f"{rate:,.0f} items/s{eta}")
    console.print(f"indexed {items:,} items ({(time.monotonic() - started) / 60:.1f} min waited)")

    online = resolve_online_store(settings)
    if online.kind != "redis":
        raise BenchError("the worker needs Redis for user contexts; the stack resolved the SQLite online store")
    r = redis.Redis.from_url(online.redis_url)
    keys = Keys(settings)
    seen = lambda: int(r.get(keys.applied) or 0) + int(r.get(keys.duplicates) or 0)  # noqa: E731
    if not marker.get("sessions_published"):
        before = seen()
        events = list(itertools.islice(simulate(dataset, seed=args.seed), args.events))
        with progress_bar() as progress:
            task = progress.add_task("replaying shopper sessions", total=len(events), info="")
            report = publish(settings, events, on_sent=lambda e: progress.advance(task))
        if report.failed or report.errors:
            raise BenchError(f"session publish failed: {report.errors[:3]}")
        marker["sessions_published"] = datetime.now(UTC).isoformat()
        marker["sessions"] = len(events)
        save()
        with progress_bar() as progress:
            task = progress.add_task("worker applying sessions", total=len(events), info="")
            last, last_change = seen() - before, time.monotonic()
            while last < len(events):
                time.sleep(min(poll_s, 1.0))
                worker_alive()
                value = seen() - before
                progress.update(task, completed=value)
                if value != last:
                    last, last_change = value, time.monotonic()
                elif time.monotonic() - last_change > args.stall_timeout:
                    raise BenchError(f"the worker stopped applying events at {value} of {len(events)}")

    if args.retriever_minutes > 0:
        serve_trained_retriever(settings, data, items, args.retriever_minutes, marker, save)

    store = feature_store(settings)
    users = [p.user_id for p in dataset.users]
    rows = store.get_online_features(features=["user_context:recent_item_ids", "user_context:affinity_categories"],
                                     entity_rows=[{"user_id": u} for u in users]).to_dict()
    with_context = sum(1 for a, b in zip(rows["recent_item_ids"], rows["affinity_categories"]) if a or b)
    console.print(f"{with_context} of {len(users)} personas have a user_context in Feast")
    milvus.close()
    r.close()
    return worker


def serve_trained_retriever(settings: Settings, data: Path, items: int, minutes: float, marker: dict, save) -> None:
    """Train the unified retriever on the benchmark's data within ``minutes`` (reused once
    written), then `tailbridge reindex` serving to it: the measurement serves what the design is
    about, not MiniLM. The worker keeps indexing into whichever collection serves."""
    from tailbridge.models.retrieval.encoders import retriever_dir
    from tailbridge.models.retrieval.export import INT8_FILE
    from tailbridge.streams import item_index

    version = f"bench-{data.name}-{items // 1000}k"
    if not (retriever_dir(version) / INT8_FILE).is_file():
        cli(settings, "train", "retriever", "--data", str(data), "--version", version, "--max-minutes", f"{minutes:g}")
    milvus = item_index.connect(settings)
    try:
        if item_index.serving_version(milvus, settings) != version:
            cli(settings, "reindex", "--model", version)
    finally:
        milvus.close()
    marker["retriever"] = version
    save()


# ------------------------------------------------------------------ smoke


SMOKE = {"items": 150, "users": 20, "events": 400, "rates": "5", "duration": 3.0, "warmup": 1.0, "runs": 1,
         "retriever_minutes": 0.0, "context_concurrency": 10}


def smoke(args) -> int:
    """Everything at tiny sizes on the stack the settings point at: a 150-item demo catalog in a
    temp dir (unless --data), a worker that indexes it and folds 400 session events, the app
    (`tailbridge serve` on a free port), then the measurement at 5 requests/s for 3 s. It stops
    what it started; the namespace's topics, keys and collections stay (use a namespace of
    its own)."""
    for name, value in SMOKE.items():
        setattr(args, name, value)
    settings = Settings()
    scratch = Path(tempfile.mkdtemp(prefix="tb-bench-serving-"))
    args.data = args.data or scratch / "demo"
    port = free_port()
    args.url = f"http://127.0.0.1:{port}"
    app = Worker(settings, scratch / "serve.log", argv=[CLI, "serve", "--port", str(port)])
    worker = None
    try:
        worker = prepare(args, poll_s=0.5, beside=app)

        def app_ready() -> bool:
            try:
                return httpx.get(f"{args.url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        with console.status(f"starting the app: `tailbridge serve --port {port}`"):
            wait_until(app_ready, 240, "the app to be ready", 0.5, app)
        return measure(args)
    finally:
        app.stop()
        if worker is not None:
            worker.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running app (tailbridge serve)")
    parser.add_argument("--data", type=Path, help="demo data dir (queries.jsonl; --prepare builds it)")
    parser.add_argument("--rates", default="20,50,100", help="requests/s, comma separated (default 20,50,100)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per rate and phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at the rate before measuring")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians across runs are reported")
    parser.add_argument("--context-concurrency", type=int, default=50,
                        help="concurrent user-context reads per burst in the context-read comparison")
    parser.add_argument("--k", type=int, default=10, help="results per search")
    parser.add_argument("--mix", default="head=0.4,torso=0.2,tail=0.4", help="query strata weights")
    parser.add_argument("--users", type=int, default=200,
                        help="shoppers to draw from GET /users (with --prepare: personas to generate)")
    parser.add_argument("--anonymous", action="store_true", help="send no user ids (personalisation off)")
    parser.add_argument("--no-direct", action="store_true", help="skip the bare-engine phase")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pids", default="", help="extra processes for the CPU table, name=PID,...")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--prepare", action="store_true", help="build the catalog setup instead of measuring")
    parser.add_argument("--smoke", action="store_true",
                        help="prepare a tiny catalog, start a worker and the app, measure a few seconds at 5/s, stop "
                             "them: checks the benchmark works on the stack the settings point at, measures nothing")
    parser.add_argument("--items", type=int, default=50_000, help="--prepare: catalog size (default 50,000)")
    parser.add_argument("--events", type=int, default=20_000, help="--prepare: simulated session events to replay")
    parser.add_argument("--no-worker", action="store_true", help="--prepare: a worker already runs; start none")
    parser.add_argument("--retriever-minutes", type=float, default=4.0,
                        help="--prepare: train the unified retriever on the data within this budget and serve it "
                             "(reindex); 0 keeps the worker's MiniLM vectors")
    parser.add_argument("--force", action="store_true", help="--prepare: redo steps a marker says are done")
    parser.add_argument("--stall-timeout", type=float, default=600.0, help="--prepare: give up after this long "
                        "without progress (s)")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    try:
        if args.smoke:
            return smoke(args)
        if args.prepare:
            if args.data is None:
                parser.error("--prepare needs --data DIR")
            prepare(args)
            console.print("next: `tailbridge serve` with the same environment, then\n  .venv/bin/python -m "
                          f"tailbridge.bench.serving --url http://127.0.0.1:8000 --data {args.data}")
            return 0
        if args.data is None:
            parser.error("--data DIR (the demo data the app's catalog was built from) is needed for the queries")
        return measure(args)
    except (BenchError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]{'prepare failed' if args.prepare else 'error'}:[/] {exc}")
        return 1


async def context_reads(settings: Settings, users: list[str], concurrency: int, rounds: int) -> dict:
    """The user-context read three ways, each as bursts of ``concurrency`` reads at once (what
    that many concurrent searches ask of it): straight from Feast's Redis rows on an async
    client (what the handler does), Feast's own ``get_online_features_async``, and Feast's sync
    ``get_online_features`` on 4 threads (the handler before). Latency of each read from the
    start of its burst; ``within_deadline`` is the share a search would have personalised."""
    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.feature_repo.store import feature_store
    from tailbridge.serving.context import USER_CONTEXT_FEATURES, RedisOnlineFeatures

    online = resolve_online_store(settings)
    if online.kind != "redis" or not users:
        return {}
    store = feature_store(settings)
    store.refresh_registry()
    direct = RedisOnlineFeatures(settings, online.redis_url)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feast-sync")
    loop = asyncio.get_running_loop()

    def sync_read(user: str):
        return store.get_online_features(features=USER_CONTEXT_FEATURES, entity_rows=[{"user_id": user}]).to_dict()

    paths = {
        "direct_async_redis": direct.user_context,
        "feast_async": lambda u: store.get_online_features_async(features=USER_CONTEXT_FEATURES,
                                                                 entity_rows=[{"user_id": u}]),
        "feast_sync_4_threads": lambda u: loop.run_in_executor(pool, sync_read, u),
    }
    deadline_ms = settings.serve_context_timeout_ms
    out: dict[str, Any] = {"concurrency": concurrency, "rounds": rounds, "deadline_ms": deadline_ms}
    try:
        for name, read in paths.items():
            await asyncio.gather(*(read(u) for u in users[:4]))  # connections and registry warm
            latencies, failed = [], 0
            for r in range(rounds):
                burst = [users[(r * concurrency + i) % len(users)] for i in range(concurrency)]
                started = time.perf_counter()
                for ms in await asyncio.gather(*(_read_ms(read, u, started) for u in burst)):
                    if ms is None:
                        failed += 1
                    else:
                        latencies.append(ms)
            out[name] = {**latency_summary(latencies), "failed": failed,
                         "within_deadline": sum(ms <= deadline_ms for ms in latencies) / (rounds * concurrency)}
    finally:
        await direct.close()
        pool.shutdown(wait=False)
    return out


async def _read_ms(read, user: str, started: float) -> float | None:
    """Milliseconds from ``started`` until ``read(user)`` answered; None if it failed."""
    try:
        await read(user)
    except Exception:  # noqa: BLE001  counted as failed
        return None
    return (time.perf_counter() - started) * 1000


def print_context_reads(result: dict) -> None:
    if not result:
        return
    t = Table(title=f"user-context read, {result['concurrency']} at once x {result['rounds']} bursts: ms from the "
                    f"burst's start, share within the {result['deadline_ms']:g} ms deadline")
    for column in ("path", "p50", "p99", "max", "within deadline", "failed"):
        t.add_column(column, justify="left" if column == "path" else "right")
    for name, r in result.items():
        if isinstance(r, dict):
            t.add_row(name, fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["max_ms"]), f"{100 * r['within_deadline']:.1f}%",
                      str(r["failed"]))
    console.print(t)


def measure(args) -> int:
    import torch

    from tailbridge.serving.index import ServingIndex
    from tailbridge.serving.models import load_query_encoder

    torch.set_num_threads(1)
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    mix = {k: float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    settings = Settings()
    try:
        ready = httpx.get(f"{args.url}/readyz", timeout=30)
    except httpx.HTTPError as exc:
        raise BenchError(f"the app at {args.url} does not answer ({exc}): start it with `tailbridge serve`") from None
    readiness = ready.json()
    if ready.status_code != 200:
        raise BenchError(f"the app is not ready: {readiness}")
    users: list[str] = []
    users_source = "anonymous (--anonymous)"
    if not args.anonymous:
        got = httpx.get(f"{args.url}/users", params={"limit": args.users}, timeout=120).json()
        users, users_source = got["user_ids"], got["source"]
        if not users:
            raise BenchError(f"no shopper has a user_context ({users_source}): run --prepare (it replays sessions), "
                             "or pass --anonymous to measure without personalisation")
    by_stratum = load_queries(args.data)
    total_requests = int(max(rates) * (args.duration + args.warmup)) * 4
    plan = make_plan(by_stratum, mix, users, max(total_requests, 2000), args.seed)

    index = ServingIndex(settings, encoder_threads=1)
    serving = asyncio.run(index.refresh())
    limit = max(settings.serve_candidates, args.k)
    vectors: dict[str, np.ndarray] = {}
    with console.status(f"encoding the plan's queries with {serving.version} (for the bare-engine phase)"):
        encoder = load_query_encoder(serving.version, settings)
        unique = sorted(set(plan.queries))
        for start in range(0, len(unique), 256):
            chunk = unique[start:start + 256]
            for text, vector in zip(chunk, encoder.encode_queries(chunk, [None] * len(chunk))):
                vectors[text] = np.asarray(vector, dtype=np.float32)

    settler = Settler(index, serving, vectors[plan.queries[0]], plan.queries[0], limit)
    port = int(args.url.rsplit(":", 1)[1].split("/")[0]) if args.url.count(":") >= 2 else 80
    pids: dict[str, int | None] = {"app": listening_pid(port), "bench": os.getpid()}
    for n, pid in enumerate(namespace_workers(settings)):
        pids[f"worker{n + 1 if n else ''}"] = pid
    pids |= {name: pid for name, pid in stack_pids(stack_status(settings)).items() if pid}
    for item in filter(None, args.pids.split(",")):
        name, _, pid = item.partition("=")
        pids[name] = int(pid)
    meta = run_meta(url=args.url, readyz=readiness, users=len(users), users_source=users_source, rates=rates,
                    duration_s=args.duration, warmup_s=args.warmup, k=args.k, limit_per_route=limit, mix=mix,
                    milvus_uri=settings.milvus_uri, collection=serving.collection, encoder_version=serving.version,
                    lexical_route="term index" if serving.terms is not None else "Milvus BM25", pids=pids,
                    smoke=args.smoke, direct_search_alone_ms=round(settler.baseline_ms, 1))
    console.print(f"[bold]tailbridge serving benchmark[/]: {args.url}, rates {', '.join(f'{r:g}' for r in rates)}/s, "
                  f"{args.duration:g} s each after {args.warmup:g} s warm-up, {args.runs} run(s); "
                  f"{len(users)} shoppers ({users_source}); candidates per route {limit}; "
                  f"{os.cpu_count()} CPUs, load average {loadavg_text()}" + (" (smoke)" if args.smoke else ""))
    console.print(f"  readyz: {readiness['dependencies']}")
    console.print(f"  serving {serving.collection} ({serving.version}); lexical route: {meta['lexical_route']}")
    console.print(f"  one search straight to the engine (dense | lexical), nothing else running from here: "
                  f"{settler.baseline_ms:.1f} ms")
    console.print(f"  processes for the CPU table: {pids}")

    contexts = asyncio.run(context_reads(settings, users, args.context_concurrency, 3 if args.smoke else 10))
    print_context_reads(contexts)

    runs = []
    for run in range(args.runs):
        console.rule(f"run {run + 1}/{args.runs}")
        runs.append({"run": run + 1, "rates": [measure_rate(args, plan, index, serving, vectors, limit, rate, run, pids,
                                                             settler) for rate in rates]})
    settler.wait()
    index.close()
    summary_ = summarise(runs, rates)
    verdict = verdicts(summary_)
    meta["loadavg_end"] = os.getloadavg()
    meta["model_versions"] = next((get(x, "handler.model_versions") for r in runs for x in r["rates"]
                                   if get(x, "handler.model_versions")), None)
    print_results(runs, rates, summary_, verdict)
    for line in diagnose(runs, rates, summary_):
        console.print(line)
    console.print(f"models served: {meta['model_versions']}")
    console.print("[dim]The machine may be shared: compare runs only under the same load (load average "
                  f"{loadavg_text(meta['loadavg_start'])} at start, {loadavg_text(meta['loadavg_end'])} at end; "
                  "see the CPU table).[/]")
    write_json(args.json, {"meta": meta, "targets": verdict, "context_reads": contexts, "summary": summary_,
                           "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
