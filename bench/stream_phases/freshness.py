"""Feature freshness: with a worker running, simulated events are published at a fixed rate
(1,000/s) with probe clicks of dedicated probe users interleaved; the time from each probe's
send until Feast ``get_online_features`` shows it. A passive Kafka consumer with the worker's
fetch wait notes when each probe reaches a consumer: the broker's share of that time; the rest
(faust's delivery, batching, the Redis transaction) is the worker's."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

from tailbridge.bench.common import BenchError, latency_summary, pct, progress_bar, wait_until
from tailbridge.bench.stream_phases.namespace import Namespace, Setup, check_publish, finish_worker, \
    publish_while_polling, seed_catalog
from tailbridge.settings import Settings
from tailbridge.streams.events import InteractionEvent, utc_now
from tailbridge.streams.topics import TOPICS
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import simulate


class ProbeFeed:
    """Background events with a probe click of a dedicated probe user every 1/probe_rate s.
    Probe times are taken when the producer accepts the send (``on_sent``)."""

    def __init__(self, background: list, rate: float, probe_rate: float, users: list[str], items: list[str],
                 tag: str):
        self.background, self.users, self.items = background, users, items
        self.user_set = set(users)
        self.every = max(1, round(rate / probe_rate))
        self.sent: dict[str, tuple[str, int, float]] = {}  # probe event id -> (user, event ms, send wall)
        self.pending: dict[str, list[tuple[int, float, str]]] = {}  # user -> [(event ms, send wall, id)]
        self.lock = threading.Lock()
        self.count = 0
        self.tag = tag
        self.rng = random.Random(tag)

    def probe(self, n: int) -> InteractionEvent:
        user = self.users[n % len(self.users)]
        return InteractionEvent(user_id=user, session_id=f"{user}-{self.tag}", action="click",
                                item_id=self.rng.choice(self.items), position=1, event_time=utc_now())

    def total(self) -> int:
        """Background events plus the probes between them."""
        return len(self.background) + sum(1 for i in range(len(self.background)) if i % self.every == self.every // 2)

    def __iter__(self) -> Iterator:
        probes = 0
        for i, event in enumerate(self.background):
            if i % self.every == self.every // 2:
                yield self.probe(probes)
                probes += 1
            yield event

    def on_sent(self, event) -> None:
        self.count += 1
        if isinstance(event, InteractionEvent) and event.user_id in self.user_set:
            event_ms = int(event.event_time.timestamp() * 1000)
            sent_wall = time.time()
            with self.lock:
                self.pending.setdefault(event.user_id, []).append((event_ms, sent_wall, event.event_id))
                self.sent[event.event_id] = (event.user_id, event_ms, sent_wall)


def probe_feed(setup: Setup, ns: Namespace, seed: int) -> ProbeFeed:
    cfg = setup.cfg
    count = int(cfg.freshness_rate * cfg.freshness_seconds)
    background = list(itertools.islice(simulate(setup.dataset, seed=seed), count))
    probe_users = [f"probe-{ns.tag}-{k:02d}" for k in range(cfg.probe_users)]
    return ProbeFeed(background, cfg.freshness_rate, cfg.probe_rate, probe_users,
                     [it.item_id for it in setup.dataset.items], ns.tag)


class DeliveryProbe(threading.Thread):
    """A passive aiokafka consumer (no group, every partition assigned, the worker's fetch wait:
    ``worker_fetch_wait_ms``) noting when each probe reaches a consumer: the Kafka share of
    feature freshness."""

    def __init__(self, settings: Settings, topic: str, marker: bytes):
        super().__init__(name="delivery-probe", daemon=True)
        self.settings, self.topic, self.marker = settings, topic, marker
        self.received: dict[str, float] = {}
        self.ready = threading.Event()
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001  reported by the phase
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        import orjson
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_wait_ms=self.settings.worker_fetch_wait_ms,
                                    client_id="tailbridge-bench-probe")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(self.topic, p) for p in range(self.settings.topic_partitions)])
            await consumer.seek_to_beginning()
            self.ready.set()
            while not self.stop_flag.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for messages in batches.values():
                    for message in messages:
                        if self.marker in message.value:
                            self.received.setdefault(orjson.loads(message.value)["event_id"], now)
        finally:
            await consumer.stop()


def run(setup: Setup, run_index: int) -> dict:
    cfg = setup.cfg
    ns = Namespace(setup, f"fresh{run_index}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "rate": cfg.freshness_rate,
                              "seconds": cfg.freshness_seconds, "probe_rate": cfg.probe_rate, "poll_s": cfg.poll_s}
    try:
        seed_catalog(ns, setup.dataset.items)
        feed = probe_feed(setup, ns, seed=cfg.seed * 100 + 50 + run_index)
        worker = ns.worker("freshness")
        worker.start()
        started = time.monotonic()
        poll_times: list[float] = []

        def visible_times(users: list[str]) -> dict[str, int]:
            t = time.perf_counter()
            got = ns.store.get_online_features(features=["user_context:recent_action_times_ms"],
                                               entity_rows=[{"user_id": u} for u in users]).to_dict()
            poll_times.append(time.perf_counter() - t)
            return {u: (times[0] if times else 0) for u, times in zip(users, got["recent_action_times_ms"])}

        delivery = DeliveryProbe(ns.settings, TOPICS["interactions"].topic(ns.settings), f'"probe-{ns.tag}-'.encode())
        delivery.start()
        if not delivery.ready.wait(60):
            raise BenchError("the Kafka delivery probe consumer did not start within 60 s")
        if delivery.error:
            raise BenchError(f"the Kafka delivery probe consumer failed: {delivery.error!r}")
        # Warm-up: one probe per probe user, through the worker into Feast, before the clock starts.
        warm = [feed.probe(k) for k in range(len(feed.users))]
        check_publish(publish(ns.settings, warm), len(warm), "the warm-up probes")
        warm_ms = {e.user_id: int(e.event_time.timestamp() * 1000) for e in warm}
        with progress_bar() as progress:
            progress.add_task("worker start-up (warm-up probes)", total=None, info="")
            wait_until(lambda: all(visible_times(feed.users).get(u, 0) >= ms for u, ms in warm_ms.items()),
                       cfg.startup_timeout_s, "the warm-up probes to reach Feast", 0.2, worker)
        result["startup_s"] = time.monotonic() - started
        applied_before = ns.applied()

        latencies: list[float] = []
        from_event_time: list[float] = []
        visible_at: dict[str, float] = {}  # probe event id -> when Feast showed it

        def poll() -> tuple[int, str]:
            with feed.lock:
                users = [u for u, probes in feed.pending.items() if probes]
            if users:
                seen = visible_times(users)
                now = time.time()
                with feed.lock:
                    for user in users:
                        shown = seen.get(user, 0)
                        keep = []
                        for event_ms, sent_wall, event_id in feed.pending[user]:
                            if shown >= event_ms:
                                latencies.append((now - sent_wall) * 1000)
                                visible_at[event_id] = now
                                from_event_time.append(now * 1000 - event_ms)
                            else:
                                keep.append((event_ms, sent_wall, event_id))
                        feed.pending[user] = keep
            p50 = pct(latencies, 50)
            return feed.count, f"probes {len(latencies)}" + (f", p50 {p50:.0f} ms" if p50 else "")

        def left() -> int:
            with feed.lock:
                return sum(len(p) for p in feed.pending.values())

        def publisher_done() -> None:
            result["publish_done_at"] = time.time()
            result["backlog_at_publish_end"] = feed.count - (ns.applied() - applied_before)
            result["cpu_cores"] = cpu.stop()

        expected_total = feed.total()
        cpu = ns.cpu_window(worker)
        report = publish_while_polling(
            ns.settings, feed, cfg.freshness_rate, feed.on_sent, poll=poll, left=left, publisher_done=publisher_done,
            worker=worker, cfg=cfg, label=f"{cfg.freshness_rate:,.0f} ev/s + probes", total=expected_total,
            what="probes (in Feast)")
        check_publish(report, expected_total, "the freshness stream")
        result["published"] = report.total
        result["publish_events_per_s"] = report.total / report.seconds
        result["publish_s"] = report.seconds
        # Did the worker keep up? Wait for the applied counter to cover the whole stream.
        target = applied_before + report.total
        wait_until(lambda: ns.applied() >= target, cfg.stall_timeout_s, "the freshness stream to be applied", 0.05,
                   worker)
        result["drain_after_publish_s"] = time.time() - result.pop("publish_done_at")
        result["probes"] = latency_summary(latencies)
        wait_until(lambda: all(i in delivery.received for i in feed.sent), 30,
                   "the delivery probe consumer to see every probe", 0.05)
        delivery.stop_flag.set()
        delivery.join(10)
        kafka_ms = [(delivery.received[i] - sent_wall) * 1000 for i, (_, _, sent_wall) in feed.sent.items()]
        result["kafka_delivery"] = latency_summary(kafka_ms)
        result["after_delivery"] = latency_summary([(at - delivery.received[i]) * 1000 for i, at in visible_at.items()])
        result["probes_from_event_time"] = latency_summary(from_event_time)
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        result["poll_ms_median"] = (pct(poll_times, 50) or 0) * 1000
        finish_worker(result, worker)
    finally:
        result["cleanup"] = ns.close()
    return result
