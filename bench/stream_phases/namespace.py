"""What every phase of the stream benchmark uses: its sizes (``Config``), what the command
hands each phase (``Setup``), and a namespace of its own on the stack (``Namespace``: a
unique topic prefix and Feast project, so no measurement sees another's data), with the
helpers that feed and watch a worker there."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tailbridge.bench.common import BenchError, CpuWindow, Worker, progress_bar
from tailbridge.feature_repo.online import resolve_online_store
from tailbridge.feature_repo.store import apply as feast_apply
from tailbridge.feature_repo.store import feature_store
from tailbridge.settings import Settings
from tailbridge.streams import item_index
from tailbridge.streams.behaviour import Keys
from tailbridge.streams.topics import all_topic_names, create_topics
from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic.replay import PublishReport, publish


@dataclass
class Config:
    """Sizes and rates of every phase (the command picks them: default, --quick or --smoke)."""
    runs: int
    mode: str  # "default", "quick" or "smoke"
    seed: int
    dataset_items: int
    dataset_users: int
    throughput_events: int
    throughput_workers: int
    freshness_rate: float
    freshness_seconds: float
    probe_rate: float
    probe_users: int
    vector_rate: float
    vector_seconds: float
    catalog_items: int
    behaviour_batches: int
    index_batches: int
    poll_s: float
    startup_timeout_s: float
    stall_timeout_s: float


@dataclass
class Setup:
    """What the command hands every phase: the sizes, the stack's settings, a scratch dir, the
    demo data set and the stack's processes (for the CPU table)."""
    cfg: Config
    base: Settings
    workdir: Path
    dataset: synth.SynthDataset
    stack_pids: dict[str, int | None]


class Namespace:
    """A topic prefix and Feast project of its own on the stack; ``close`` removes its keys,
    collections and topics."""

    def __init__(self, setup: Setup, tag: str, overrides: dict | None = None):
        rid = uuid.uuid4().hex[:8]
        self.tag = f"{tag}-{rid}"
        self.setup = setup
        self.settings = setup.base.model_copy(update={
            "topic_prefix": f"tbbench-{tag}-{rid}", "feast_project": f"tbbench_{tag}_{rid}",
            "data_dir": setup.workdir / "data" / self.tag, **(overrides or {})})
        share_minilm_export(setup.workdir, self.settings.data_dir)
        self.keys = Keys(self.settings)
        create_topics(self.settings)
        self.store = feature_store(self.settings)
        feast_apply(self.store)
        online = resolve_online_store(self.settings)
        if online.kind != "redis":
            raise BenchError("the worker needs Redis; the stack resolved the SQLite online store")
        self.redis = redis.Redis.from_url(online.redis_url, socket_timeout=30)
        self.milvus = item_index.connect(self.settings)
        self.workers: list[Worker] = []

    def worker(self, name: str, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Worker:
        """A worker for this namespace (not started), logging under the scratch dir."""
        worker = Worker(self.settings, self.setup.workdir / "workers" / f"{self.tag}-{name}" / "worker.log", argv, env)
        self.workers.append(worker)
        return worker

    def cpu_window(self, workers: Worker | list[Worker] | None) -> CpuWindow:
        """CPU of the stack, this process and the workers ("worker": all of them together)."""
        workers = _listed(workers)
        parts = {f"worker {k + 1}": w.pid for k, w in enumerate(workers)} if len(workers) > 1 else {}
        return CpuWindow({**self.setup.stack_pids, "bench": os.getpid()}, groups={"worker": [w.pid for w in workers]},
                         parts=parts)

    def applied(self) -> int:
        return int(self.redis.get(self.keys.applied) or 0)

    def close(self) -> dict:
        done: dict[str, Any] = {}
        for worker in self.workers:
            worker.stop()
        try:
            self.store.teardown()
        except Exception as exc:  # noqa: BLE001  cleanup goes on
            done["feast_teardown_error"] = repr(exc)
        deleted = 0
        for key in self.redis.scan_iter(f"{self.keys.root}:*", count=1000):
            deleted += self.redis.delete(key)
        done["redis_keys_deleted"] = deleted
        try:
            alias = item_index.alias_name(self.settings)
            if alias in self.milvus.list_aliases()["aliases"]:
                self.milvus.drop_alias(alias)
            for name in item_index.live_collections(self.milvus, self.settings):
                self.milvus.drop_collection(name)
        except Exception as exc:  # noqa: BLE001
            done["milvus_cleanup_error"] = repr(exc)
        finally:
            self.milvus.close()
        try:
            from kafka import KafkaAdminClient

            admin = KafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap.split(","),
                                     client_id="tailbridge-bench", bootstrap_timeout_ms=10_000)
            try:
                admin.delete_topics(all_topic_names(self.settings), timeout_ms=10_000)
                done["topics_deleted"] = True
            finally:
                admin.close()
        except Exception as exc:  # noqa: BLE001  Tansu keeps them in memory until `stack down` anyway
            done["topics_deleted"] = f"no: {exc!r}"[:200]
        self.redis.close()
        return done


def share_minilm_export(workdir: Path, data_dir: Path) -> None:
    """Give the namespace's data dir the benchmark's one MiniLM ONNX export (made here once). A
    worker exports it on first use of a data dir (10-20 s of CPU, torch and quantisation) while
    it already consumes; a deployment does that once, a benchmark would in every measurement."""
    from tailbridge.models.retrieval.export import MINILM_ONNX_DIR, OnnxMiniLMEncoder

    shared = workdir / "models" / MINILM_ONNX_DIR
    if not shared.is_dir():
        OnnxMiniLMEncoder(shared)  # exports
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / MINILM_ONNX_DIR).symlink_to(shared, target_is_directory=True)


def seed_catalog(ns: Namespace, items: list[synth.Item]) -> None:
    """What the indexer would have left behind for these items that the behaviour path reads:
    their categories in Redis (so interactions add affinities at once, as in production)."""
    ns.redis.hset(ns.keys.item_category, mapping={it.item_id: it.category_path[-1] for it in items})


def check_publish(report, expected: int, what: str) -> None:
    if report.errors or report.failed or report.total != expected:
        raise BenchError(f"publishing {what}: {report.total} of {expected} acknowledged; "
                         f"failed {dict(report.failed)}; errors {report.errors[:3]}")


def _listed(workers: Worker | list[Worker] | None) -> list[Worker]:
    return [] if workers is None else list(workers) if isinstance(workers, list) else [workers]


def stall_guard(read: Callable[[], int], target: int, stall_s: float, first_timeout_s: float, what: str,
                workers: Worker | list[Worker], on_sample: Callable[[float, int], None],
                interval: float = 0.02) -> None:
    """Poll a counter until it reaches ``target``: at most ``first_timeout_s`` for the first
    increment, then at most ``stall_s`` without progress (and stop if a worker exits)."""
    workers = _listed(workers)
    started = last_change = time.monotonic()
    last = read()
    on_sample(time.time(), last)
    while last < target:
        time.sleep(interval)
        value = read()
        now = time.monotonic()
        on_sample(time.time(), value)
        if value != last:
            last, last_change = value, now
            continue
        for worker in workers:
            worker.check_alive()
        limit = first_timeout_s if value == 0 else stall_s
        if now - (last_change if value else started) > limit:
            tails = "".join(f"\n--- worker log tail ({w.log_path}) ---\n{w.log_tail()}" for w in workers)
            raise BenchError(f"{what}: stuck at {value} of {target} for {limit:.0f} s{tails}")


def publish_while_polling(settings: Settings, events: Iterable, rate: float, on_sent: Callable[[Any], None], *,
                          poll: Callable[[], tuple[int, str]], left: Callable[[], int],
                          publisher_done: Callable[[], None], worker: Worker, cfg: Config, label: str,
                          total: int, what: str) -> PublishReport:
    """Publish ``events`` at ``rate`` on a thread while calling ``poll`` every ``cfg.poll_s``
    (it notes what has become visible and returns the progress: events sent, a short text).
    When the publisher is done, ``publisher_done`` runs once and polling goes on until
    ``left()`` is 0, at most ``cfg.stall_timeout_s``."""
    box: dict[str, PublishReport] = {}
    sender = threading.Thread(target=lambda: box.update(report=publish(settings, events, rate=rate, on_sent=on_sent)),
                              name="publisher", daemon=True)
    deadline = None
    with progress_bar() as progress:
        task = progress.add_task(label, total=total, info="")
        sender.start()
        while True:
            sent, info = poll()
            progress.update(task, completed=sent, info=info)
            worker.check_alive()
            if not sender.is_alive():
                if deadline is None:
                    publisher_done()
                    deadline = time.monotonic() + cfg.stall_timeout_s
                waiting = left()
                if not waiting:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{waiting} {what} not visible {cfg.stall_timeout_s:.0f} s after the publisher "
                                     f"finished\n--- worker log tail ---\n{worker.log_tail()}")
            time.sleep(cfg.poll_s)
    sender.join(5)
    if "report" not in box:
        raise BenchError(f"the publisher of the {what} failed (see the traceback above)")
    return box["report"]


def finish_worker(result: dict, workers: Worker | list[Worker]) -> None:
    """Stop a phase's workers and note their memory (the first one's before and at the end; the
    others' at the end) and what their logs say (added up)."""
    workers = _listed(workers)
    result.setdefault("memory_worker", workers[0].memory())
    for worker in workers:
        worker.stop()
    result["memory_worker_final"] = workers[0].final_memory
    result["memory_workers_final"] = [w.final_memory for w in workers]
    logs = [w.log_summary() for w in workers]
    result["worker_log"] = logs[0] if len(logs) == 1 else {
        "log": ", ".join(log["log"] for log in logs),
        **{k: sum(log[k] for log in logs) for k in ("retries", "tracebacks", "errors", "dead_lettered",
                                                      "overlapping_timers")},
        "reports": [r for log in logs for r in log["reports"]],
        "first_problem": next((log["first_problem"] for log in logs if log["first_problem"]), None)}
