"""Where the worker's time goes, in-process (no Kafka): ``BehaviourProcessor.process`` on
batches of as many events as the worker hands it (``behaviour.batch_events``), split into decode, Redis reads (categories, WATCH,
user states), the fold, staging the writes (Feast rows among them) and the Redis write (one
script call in MULTI/EXEC); one item-stats flush; ``Indexer.process`` on batches of 50 items,
split into encode (the worker's item encoder: MiniLM on ONNX int8), Milvus upsert and the rest.
Medians over the batches after a warm-up batch; CPU seconds per batch of this process beside
the wall time, and of Redis (the script runs there)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from tailbridge.bench.common import cpu_ticks, CLOCK_TICKS, pct, progress_bar
from tailbridge.bench.stream_phases.namespace import Namespace, Setup, seed_catalog
from tailbridge.streams.behaviour import BehaviourProcessor, batch_events
from tailbridge.streams.events import decode, encode
from tailbridge.streams.topics import TOPICS
from tailbridge.synthetic.shoppers import catalog_events, simulate

INDEX_BATCH = 50


def _timed(obj: Any, name: str, bucket: dict[str, float]) -> None:
    """Wrap a method on this instance only, adding its wall time to ``bucket[name]``."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[name] = bucket.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def run(setup: Setup, run_index: int) -> dict:
    import torch

    torch.set_num_threads(1)  # as the worker runs (OMP_NUM_THREADS=1)
    result: dict[str, Any] = {}
    ns = Namespace(setup, f"stage{run_index}")
    try:
        result.update(behaviour_stages(setup, ns, run_index))
    finally:
        result["cleanup_behaviour"] = ns.close()
    ns = Namespace(setup, f"stagei{run_index}")
    try:
        result.update(indexer_stages(setup, ns))
    finally:
        result["cleanup_indexer"] = ns.close()
    return result


def behaviour_stages(setup: Setup, ns: Namespace, run_index: int) -> dict:
    cfg = setup.cfg
    result: dict[str, Any] = {}
    seed_catalog(ns, setup.dataset.items)
    processor = BehaviourProcessor(ns.settings, ns.redis, ns.store)
    bucket: dict[str, float] = {}
    _timed(processor.user_rows, "fields", bucket)
    _timed(processor.item_rows, "fields", bucket)
    redis_pid = setup.stack_pids.get("redis")
    batch_size = batch_events(ns.settings)
    stream = simulate(setup.dataset, seed=cfg.seed * 100 + 80 + run_index)
    allowed = TOPICS["queries"].events + TOPICS["interactions"].events
    rows = []
    with progress_bar() as progress:
        task = progress.add_task(f"BehaviourProcessor x {batch_size}", total=cfg.behaviour_batches + 1, info="")
        for n in range(cfg.behaviour_batches + 1):  # the first batch is a warm-up
            raw = [encode(e) for e in itertools.islice(stream, batch_size)]
            bucket.clear()
            cpu, redis_cpu = time.process_time(), cpu_ticks(redis_pid) if redis_pid else 0
            t = time.perf_counter()
            events = [decode(r, allowed=allowed) for r in raw]
            decode_s = time.perf_counter() - t
            res = processor.process(events)
            cpu = time.process_time() - cpu
            redis_cpu = (cpu_ticks(redis_pid) - redis_cpu) / CLOCK_TICKS if redis_pid else None
            progress.advance(task)
            if n == 0:
                continue
            timings = res.timings
            rows.append({
                "decode_ms": decode_s * 1000,
                "redis_read_ms": timings["read_s"] * 1000,
                "fold_ms": timings["fold_s"] * 1000,
                "stage_writes_ms": (timings["stage_s"] - bucket.get("fields", 0.0)) * 1000,
                "feast_rows_ms": bucket.get("fields", 0.0) * 1000,
                "redis_write_ms": timings["write_s"] * 1000,
                "total_ms": (decode_s + timings["total_s"]) * 1000,
                "cpu_ms": cpu * 1000,
                **({"redis_cpu_ms": redis_cpu * 1000} if redis_cpu is not None else {}),
                "users": res.users_written,
            })
        # The worker's flush timer (every worker_flush_seconds, on a thread beside the batches).
        bucket.clear()
        t = time.perf_counter()
        flushed = processor.flush_item_stats()
        result["item_stats_flush"] = {"items": flushed, "ms": (time.perf_counter() - t) * 1000,
                                      "feast_rows_ms": bucket.get("fields", 0.0) * 1000}
    block = {k: pct([r[k] for r in rows], 50) for k in rows[0]}
    block["batch_size"] = batch_size
    block["events_per_s_in_process"] = batch_size / (block["total_ms"] / 1000)
    block["cpu_us_per_event"] = block["cpu_ms"] * 1000 / batch_size
    result["behaviour_batch"] = block
    return result


def indexer_stages(setup: Setup, ns: Namespace) -> dict:
    from tailbridge.streams.indexer import Indexer

    cfg = setup.cfg
    result: dict[str, Any] = {}
    indexer = Indexer(ns.settings, ns.milvus, ns.redis)  # the worker's encoders
    bucket: dict[str, float] = {}
    _timed(ns.milvus, "upsert", bucket)
    _timed(indexer, "live", bucket)
    items = list(catalog_events(setup.dataset))
    rows = []
    with progress_bar() as progress:
        task = progress.add_task(f"Indexer x {INDEX_BATCH}", total=cfg.index_batches + 1, info="(model load)")
        for n in range(cfg.index_batches + 1):  # the first batch loads the model, creates the collection
            raw = [encode(e) for e in items[n * INDEX_BATCH:(n + 1) * INDEX_BATCH]]
            bucket.clear()
            cpu = time.process_time()
            t = time.perf_counter()
            events = [decode(r, allowed=TOPICS["catalog"].events) for r in raw]
            decode_s = time.perf_counter() - t
            res = indexer.process(events)
            cpu = time.process_time() - cpu
            progress.update(task, advance=1, info="")
            if n == 0:
                result["indexer_first_batch_s"] = res.timings["total_s"]
                result["encoder"] = type(indexer.encoder(ns.settings.encoder_version)).__name__
                continue
            encode_s = res.timings.get("encode_s", 0.0)
            upsert, live = bucket.get("upsert", 0.0), bucket.get("live", 0.0)
            rows.append({
                "decode_ms": decode_s * 1000,
                "encode_ms": encode_s * 1000,
                "milvus_upsert_ms": upsert * 1000,
                "live_collections_ms": live * 1000,
                "rows_and_redis_ms": (res.timings["total_s"] - encode_s - upsert - live) * 1000,
                "total_ms": (decode_s + res.timings["total_s"]) * 1000,
                "cpu_ms": cpu * 1000,
            })
    block = {k: pct([r[k] for r in rows], 50) for k in rows[0]}
    block["batch_size"] = INDEX_BATCH
    block["items_per_s_in_process"] = INDEX_BATCH / (block["total_ms"] / 1000)
    result["index_batch"] = block
    return result
