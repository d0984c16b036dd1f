"""The ceiling below the worker: a faust app with the worker's app settings (broker, batching,
consumer timeouts, fetch wait) whose agent only decodes, run as a subprocess. Its events/s
and CPU per event on N pre-published events, and its probe latency at the freshness phase's
rate. When this alone misses a target, no change to Redis or Feast code can meet it. Beside
it, the same events read and decoded by a plain aiokafka consumer in batches (``getmany``):
what the broker and the Kafka client cost without faust's per-message delivery.

Run as a module, this file is that no-op worker:
``python -m tailbridge.bench.stream_phases.consume`` (with the namespace's TAILBRIDGE_*
settings, and TB_BENCH_NOOP_OUT / TB_BENCH_NOOP_MARKER set).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tailbridge.bench.common import BenchError, latency_summary, progress_bar, wait_until
from tailbridge.bench.stream_phases.freshness import probe_feed
from tailbridge.bench.stream_phases.namespace import Namespace, Setup, check_publish, finish_worker, stall_guard
from tailbridge.settings import Settings
from tailbridge.streams.events import decode
from tailbridge.streams.topics import TOPICS
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import simulate

NOOP_OUT, NOOP_MARKER = "TB_BENCH_NOOP_OUT", "TB_BENCH_NOOP_MARKER"


def noop_worker_main() -> None:
    """The worker's faust app (``streams.app.faust_app``: same broker, batching and consumer
    settings), whose behaviour agent only decodes each batch (as the worker's ``parse`` does)
    and notes it in a JSON-lines file: no Redis, no Feast. What it reaches is the ceiling set
    by faust + aiokafka + the broker."""
    import faust

    from tailbridge.streams.app import faust_app

    settings = Settings()
    out = open(os.environ[NOOP_OUT], "a", buffering=1)  # noqa: SIM115  open for the process's life
    marker = os.environ[NOOP_MARKER].encode()
    app = faust_app(settings, name="noop")
    topics = app.topic(TOPICS["queries"].topic(settings), TOPICS["interactions"].topic(settings),
                       value_serializer="raw", key_serializer="raw")
    allowed = TOPICS["queries"].events + TOPICS["interactions"].events
    total = 0

    @app.agent(topics, name="behaviour")
    async def behaviour_agent(stream):
        nonlocal total
        async for batch in stream.take_events(settings.worker_batch_size, within=settings.worker_batch_seconds):
            now = time.time()
            probes = [decode(e.value).event_id for e in batch if marker in e.value]
            events = [decode(e.value, allowed=allowed) for e in batch]
            total += len(events)
            out.write(json.dumps({"n": total, "at": now, "batch": len(events), "probes": probes}) + "\n")

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


class JsonlTail:
    """Reads the no-op agent's lines as they come."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""
        self.samples: list[tuple[float, int]] = []
        self.probes: dict[str, float] = {}
        self.batches: list[int] = []

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            for line in lines:
                row = json.loads(line)
                self.samples.append((row["at"], row["n"]))
                self.batches.append(row["batch"])
                for probe in row["probes"]:
                    self.probes.setdefault(probe, row["at"])
        return self.samples[-1][1] if self.samples else 0


def run(setup: Setup, run_index: int) -> dict:
    cfg = setup.cfg
    ns = Namespace(setup, f"noop{run_index}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "events": cfg.throughput_events,
                              "rate": cfg.freshness_rate}
    try:
        events = list(itertools.islice(simulate(setup.dataset, seed=cfg.seed * 100 + run_index), cfg.throughput_events))
        check_publish(publish(ns.settings, events), len(events), "the consume events")
        out = setup.workdir / "workers" / f"{ns.tag}-noop.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        worker = ns.worker("noop", argv=[sys.executable, "-m", __name__],
                           env={NOOP_OUT: str(out), NOOP_MARKER: f'"probe-{ns.tag}-'})
        tail = JsonlTail(out)
        worker.start()
        cpu = ns.cpu_window(worker)
        with progress_bar() as progress:
            task = progress.add_task("no-op faust agent consuming", total=len(events), info="(starting)")
            started: list[int] = []

            def on_sample(at: float, value: int) -> None:
                if value and not started:
                    started.append(value)
                    cpu.start()
                progress.update(task, completed=value, info="")

            stall_guard(tail.poll, len(events), cfg.stall_timeout_s, cfg.startup_timeout_s,
                        "the no-op agent to consume the events", worker, on_sample)
        result["cpu_cores"] = cpu.stop()
        (first_at, first_n), (last_at, last_n) = tail.samples[0], tail.samples[-1]
        result["events_per_s"] = (last_n - first_n) / max(last_at - first_at, 1e-9)
        result["cpu_us_per_event"] = result["cpu_cores"]["worker"] / max(result["events_per_s"], 1e-9) * 1e6
        result["plain_aiokafka"] = plain_consumer(ns.settings, len(events))

        # Latency at the freshness phase's rate, with the same probes: Kafka + faust, no processing.
        feed = probe_feed(setup, ns, seed=cfg.seed * 100 + 60 + run_index)
        batches_before = len(tail.batches)
        with progress_bar() as progress:
            task = progress.add_task(f"{cfg.freshness_rate:,.0f} ev/s + probes to the no-op agent",
                                     total=feed.total(), info="")

            def on_sent(event) -> None:
                feed.on_sent(event)
                progress.update(task, completed=feed.count)

            report = publish(ns.settings, feed, rate=cfg.freshness_rate, on_sent=on_sent)
        if report.errors or report.failed:
            raise BenchError(f"publishing to the no-op agent: {report.errors[:3]}")
        wait_until(lambda: tail.poll() is not None and all(i in tail.probes for i in feed.sent), cfg.stall_timeout_s,
                   "the no-op agent to see every probe", 0.1, worker)
        latencies = [(tail.probes[i] - sent_wall) * 1000 for i, (_, _, sent_wall) in feed.sent.items()]
        result["probes"] = latency_summary(latencies)
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        result["median_batch_at_rate"] = statistics.median(tail.batches[batches_before:] or [0])
        finish_worker(result, worker)
    finally:
        result["cleanup"] = ns.close()
    return result


def plain_consumer(settings: Settings, total: int) -> dict:
    """Read and decode ``total`` events of the behaviour topics with a plain aiokafka consumer
    (every partition assigned, from the start, batches of up to 500): events/s and CPU per event
    of its thread (this process, while nothing else of the benchmark runs)."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    allowed = TOPICS["queries"].events + TOPICS["interactions"].events

    async def consume() -> dict:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=settings.worker_fetch_wait_ms)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(TOPICS[name].topic(settings), p)
                             for name in ("queries", "interactions") for p in range(settings.topic_partitions)])
            await consumer.seek_to_beginning()
            seen, wall, cpu = 0, None, None
            deadline = time.monotonic() + 120
            while seen < total and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                if wall is None and batches:
                    wall, cpu = time.perf_counter(), time.thread_time()
                for records in batches.values():
                    seen += len([decode(record.value, allowed=allowed) for record in records])
            if seen < total:
                raise BenchError(f"a plain consumer read {seen} of {total} events in 120 s")
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            return {"events_per_s": seen / wall, "cpu_us_per_event": cpu / seen * 1e6}
        finally:
            await consumer.stop()

    return asyncio.run(consume())


if __name__ == "__main__":
    noop_worker_main()
