"""Vector freshness: a worker indexes a catalog (the bulk indexing rate), then CatalogUpsert
updates are published at a fixed rate (50/s), each title carrying a unique token; the time
from each send until a Milvus query by id on the serving alias shows the token."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from tailbridge.bench.common import latency_summary, pct, progress_bar
from tailbridge.bench.stream_phases.namespace import Namespace, Setup, check_publish, finish_worker, \
    publish_while_polling, stall_guard
from tailbridge.streams import item_index
from tailbridge.streams.events import CatalogUpsert, utc_now
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import catalog_events

TOKEN = re.compile(r"bvt(\d+)q")  # the unique token in an updated title: bvt<seq>q<namespace>


def indexed(ns: Namespace) -> int:
    """Rows in the namespace's serving collection (0 before the indexer made it)."""
    if item_index.serving_collection(ns.milvus, ns.settings) is None:
        return 0
    return item_index.count(ns.milvus, item_index.alias_name(ns.settings))


def run(setup: Setup, run_index: int) -> dict:
    cfg = setup.cfg
    ns = Namespace(setup, f"vec{run_index}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "rate": cfg.vector_rate,
                              "seconds": cfg.vector_seconds, "catalog_items": cfg.catalog_items, "poll_s": cfg.poll_s}
    try:
        base_events = list(itertools.islice(catalog_events(setup.dataset), cfg.catalog_items))
        worker = ns.worker("vectors")
        worker.start()
        started_wall = time.time()
        check_publish(publish(ns.settings, base_events), len(base_events), "the catalog")
        samples: list[tuple[float, int]] = []
        with progress_bar() as progress:
            task = progress.add_task("indexing the catalog", total=len(base_events), info="(start-up, model load)")

            def on_sample(at: float, value: int) -> None:
                samples.append((at, value))
                progress.update(task, completed=value, info="")

            # Rows in the serving collection (the indexer writes categories first, vectors after).
            stall_guard(lambda: indexed(ns), len(base_events), cfg.stall_timeout_s, cfg.startup_timeout_s,
                        "indexing the catalog", worker, on_sample, interval=0.25)
        first_at, first_value = next((t, v) for t, v in samples if v > 0)
        last_at = samples[-1][0]
        result["catalog_startup_s"] = first_at - started_wall
        # From the first indexed batch to the last (none when the first batch was the whole catalog).
        result["catalog_index_items_per_s"] = ((len(base_events) - first_value) / max(last_at - first_at, 1e-9)
                                               if first_value < len(base_events) else None)
        alias = item_index.alias_name(ns.settings)

        by_id = {e.item_id: e for e in base_events}
        order = [e.item_id for e in base_events]
        total = int(cfg.vector_rate * cfg.vector_seconds)
        pending: dict[str, list[tuple[int, float]]] = {}  # item -> [(seq, send wall)]
        lock = threading.Lock()
        latencies: list[float] = []
        query_times: list[float] = []
        sent_count = [0]
        marks: dict[str, float] = {}

        def updates() -> Iterator[CatalogUpsert]:
            for seq in range(total):
                item = by_id[order[seq % len(order)]]
                yield item.model_copy(update={"title": f"{item.title} bvt{seq:06d}q{ns.tag[-4:]}",
                                              "event_id": uuid.uuid4().hex, "event_time": utc_now()})

        def on_sent(event: CatalogUpsert) -> None:
            seq = int(TOKEN.search(event.title).group(1))
            sent_wall = time.time()
            marks.setdefault("first_sent", sent_wall)
            with lock:
                pending.setdefault(event.item_id, []).append((seq, sent_wall))
            sent_count[0] += 1

        def poll() -> tuple[int, str]:
            with lock:
                ids = [i for i, p in pending.items() if p]
            if ids:
                t = time.perf_counter()
                rows = ns.milvus.query(alias, ids=ids, output_fields=["item_id", "title"])
                query_times.append(time.perf_counter() - t)
                now = time.time()
                shown = {}
                for row in rows:
                    match = TOKEN.search(row["title"])
                    shown[row["item_id"]] = int(match.group(1)) if match else -1
                with lock:
                    for item in ids:
                        keep = []
                        for seq, sent_wall in pending[item]:
                            if shown.get(item, -1) >= seq:
                                latencies.append((now - sent_wall) * 1000)
                                marks["last_visible"] = now
                            else:
                                keep.append((seq, sent_wall))
                        pending[item] = keep
            p50 = pct(latencies, 50)
            return sent_count[0], f"seen {len(latencies)}" + (f", p50 {p50:.0f} ms" if p50 else "")

        def left() -> int:
            with lock:
                return sum(len(p) for p in pending.values())

        def publisher_done() -> None:
            result["cpu_cores"] = cpu.stop()

        cpu = ns.cpu_window(worker)
        report = publish_while_polling(
            ns.settings, updates(), cfg.vector_rate, on_sent, poll=poll, left=left, publisher_done=publisher_done,
            worker=worker, cfg=cfg, label=f"{cfg.vector_rate:.0f} catalog updates/s", total=total,
            what="catalog updates (in Milvus)")
        check_publish(report, total, "the catalog updates")
        result["published"] = report.total
        result["publish_updates_per_s"] = report.total / report.seconds
        result["updates"] = latency_summary(latencies)
        # What the worker sustained: all updates from the first send to the last one visible.
        result["worker_updates_per_s"] = total / max(marks["last_visible"] - marks["first_sent"], 1e-9)
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        result["query_ms_median"] = (pct(query_times, 50) or 0) * 1000
        finish_worker(result, worker)
    finally:
        result["cleanup"] = ns.close()
    return result
