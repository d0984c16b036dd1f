"""Benchmark of the stream worker (`tailbridge worker`) on the embedded stack.

    .venv/bin/python bench/streams.py [--runs 3] [--json out.json] [--quick]

It starts its own embedded stack (Tansu, redis-server, Milvus Lite server on free loopback
ports, in a temporary state dir), and in every run measures, each in a namespace of its own
(a unique topic prefix and Feast project, so nothing is shared between measurements):

1. throughput  - N simulated behaviour events are published first (publish throughput), then
                 a worker is started and the rate of the Redis ``applied`` counter is taken
                 from its first to its last applied event (worker start-up excluded).
2. freshness   - with a worker running, simulated events are published at a fixed rate
                 (1,000/s) with probe clicks of dedicated probe users interleaved; the time from
                 each probe's send until Feast ``get_online_features`` shows it.
3. vectors     - with a worker running and a catalog indexed by it, CatalogUpsert updates are
                 published at 50/s, each title carrying a unique token; the time from each
                 send until a Milvus query by id on the serving alias shows the token.
4. stages      - in-process: BehaviourProcessor.process on batches of 500 events and
                 Indexer.process on batches of 50 items, timed stage by stage, so a reader can
                 tell which component is the wall.

and the peak (VmHWM) and current (VmRSS) memory of the worker, broker, Milvus Lite server and
redis-server from /proc. Everything it created (stack, keys, collections, temp dir) is removed
at the end. See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path, and this file is called
# streams.py: drop that entry so `streams` is the project's package, and put the root first.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table  # noqa: E402

from tailbridge.feature_repo.store import apply as feast_apply  # noqa: E402
from tailbridge.feature_repo.store import feature_store  # noqa: E402
from tailbridge.infra import stack  # noqa: E402
from tailbridge.feature_repo.online import resolve_online_store  # noqa: E402
from tailbridge.synthetic import catalog as synth  # noqa: E402
from tailbridge.streams import item_index  # noqa: E402
from tailbridge.streams.behaviour import BehaviourProcessor, Keys  # noqa: E402
from tailbridge.streams.events import CatalogUpsert, InteractionEvent, decode, encode, utc_now  # noqa: E402
from tailbridge.synthetic.replay import publish  # noqa: E402
from tailbridge.synthetic.shoppers import catalog_events, simulate  # noqa: E402
from tailbridge.streams.topics import TOPICS, all_topic_names, create_topics  # noqa: E402
from tailbridge.settings import Settings  # noqa: E402

CLI = str(Path(sys.executable).parent / "tailbridge")
console = Console(width=None if sys.stdout.isatty() else 150)

TARGETS = {
    "throughput": (">= 5,000 events/s sustained", lambda v: v >= 5000),
    "freshness": ("p99 <= 1 s at 1,000 events/s", lambda v: v <= 1000),
    "vectors": ("p99 <= 5 s at 50 updates/s", lambda v: v <= 5000),
}
TOKEN = re.compile(r"bvt(\d+)q")  # the unique token in an updated title: bvt<seq>q<namespace>
REPORT_LINE = re.compile(r"last \d+ s: .*")  # the worker's periodic counts


class BenchError(RuntimeError):
    pass


@dataclass
class Config:
    runs: int
    quick: bool
    seed: int
    dataset_items: int
    dataset_users: int
    throughput_events: int
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


def make_config(args) -> Config:
    quick = args.quick
    return Config(
        runs=args.runs, quick=quick, seed=args.seed,
        dataset_items=5000, dataset_users=200,
        throughput_events=args.events or (5_000 if quick else 30_000),
        freshness_rate=1000.0, freshness_seconds=8.0 if quick else 20.0,
        probe_rate=10.0, probe_users=40,
        vector_rate=50.0, vector_seconds=8.0 if quick else 20.0,
        catalog_items=300 if quick else 1000,
        behaviour_batches=4 if quick else 10, index_batches=4 if quick else 10,
        poll_s=0.05, startup_timeout_s=240.0, stall_timeout_s=120.0,
    )


# ------------------------------------------------------------------ small helpers


def pct(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def latency_summary(ms: list[float]) -> dict:
    return {"count": len(ms), "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
            "max_ms": max(ms) if ms else None, "mean_ms": statistics.fmean(ms) if ms else None}


def settings_env(settings: Settings) -> dict[str, str]:
    return {f"TAILBRIDGE_{name.upper()}": str(value) for name, value in settings.model_dump().items()}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, worker: Worker | None = None,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if worker is not None:
            worker.check_alive()
        if time.monotonic() >= deadline:
            tail = f"\n--- worker log tail ({worker.log_path}) ---\n{worker.log_tail()}" if worker else ""
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(interval)


def progress_bar() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True)


# ------------------------------------------------------------------ memory from /proc


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def memory_of(pid: int | None, tree: bool = True) -> dict | None:
    """VmHWM (peak) and VmRSS (now) of a process and its descendants, in MiB. For a tree the
    peak is the sum of each process's own peak (an upper bound)."""
    if pid is None or not Path(f"/proc/{pid}").exists():
        return None
    pids = _descendants(pid) if tree else [pid]
    stats = [_status_kib(p) for p in pids]
    return {"pid": pid, "processes": len(pids),
            "peak_mib": round(sum(s.get("VmHWM", 0) for s in stats) / 1024, 1),
            "rss_mib": round(sum(s.get("VmRSS", 0) for s in stats) / 1024, 1)}


# ------------------------------------------------------------------ CPU from /proc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STACK_PIDS: dict[str, int | None] = {}  # filled by main(): the embedded stack's processes


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0


def _machine_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


class CpuWindow:
    """CPU used by each of our processes (and by the whole machine) over a measured window, in
    cores: on a shared 2-core machine this shows who the worker competed with."""

    def __init__(self, worker: Worker | None):
        self.pids = {**STACK_PIDS, "bench": os.getpid(), "worker": worker.proc.pid if worker and worker.proc else None}
        self.start()

    def _snapshot(self) -> dict[str, int]:
        # The stack and the workers are children of this process: the bench counts alone.
        return {name: sum(_cpu_ticks(p) for p in (_descendants(pid) if name != "bench" else [pid]))
                for name, pid in self.pids.items() if pid}

    def start(self) -> None:
        self.t0, self.ticks0, self.machine0 = time.monotonic(), self._snapshot(), _machine_ticks()

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.t0, 1e-9)
        ticks, (busy, _total) = self._snapshot(), _machine_ticks()
        out = {name: round((ticks[name] - self.ticks0.get(name, 0)) / CLOCK_TICKS / wall, 2) for name in ticks}
        out["machine"] = round((busy - self.machine0[0]) / CLOCK_TICKS / wall, 2)
        out["others"] = round(max(out["machine"] - sum(v for k, v in out.items() if k != "machine"), 0.0), 2)
        out["window_s"] = round(wall, 2)
        return out


# ------------------------------------------------------------------ the worker subprocess


class Worker:
    """`tailbridge worker` in its own process group, logging to a file, run from a scratch dir
    (faust writes a `<app id>-data` directory into its working directory)."""

    def __init__(self, settings: Settings, workdir: Path, name: str, argv: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.settings = settings
        self.argv = argv or [CLI, "worker"]
        self.extra_env = env or {}
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "worker.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.final_memory: dict | None = None

    def start(self) -> None:
        env = (os.environ | settings_env(self.settings) | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
               | self.extra_env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=env, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.monotonic()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the worker exited with code {self.proc.returncode}\n"
                             f"--- worker log tail ({self.log_path}) ---\n{self.log_tail()}")

    def memory(self) -> dict | None:
        return memory_of(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.final_memory = self.memory()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_summary(self) -> dict:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        lines = text.splitlines()
        return {
            "log": str(self.log_path),
            "retries": sum("failed; retrying" in line for line in lines),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "errors": sum(" ERROR " in line or line.startswith("ERROR") or "[E]" in line for line in lines),
            "dead_lettered": sum("dead-lettered" in line for line in lines),
            "overlapping_timers": sum("is overlapping" in line for line in lines),
            "reports": [m.group(0) for line in lines if (m := REPORT_LINE.search(line))][-4:],
            "first_problem": next((line for line in lines if "Traceback" in line or "failed; retrying" in line
                                   or " ERROR " in line or "[E]" in line), None),
        }


# ------------------------------------------------------------------ namespaces


class Namespace:
    """A topic prefix and Feast project of its own; ``close`` removes its keys, collections
    and topics."""

    def __init__(self, base: Settings, workdir: Path, tag: str, overrides: dict | None = None):
        rid = uuid.uuid4().hex[:8]
        self.tag = f"{tag}-{rid}"
        self.settings = base.model_copy(update={
            "topic_prefix": f"tbbench-{tag}-{rid}", "feast_project": f"tbbench_{tag}_{rid}",
            "data_dir": workdir / "data" / self.tag, **(overrides or {})})
        self.workdir = workdir
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
        worker = Worker(self.settings, self.workdir / "workers", f"{self.tag}-{name}", argv, env)
        self.workers.append(worker)
        return worker

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


def seed_catalog(ns: Namespace, items: list[synth.Item]) -> None:
    """What the indexer would have left behind for these items: their categories in Redis and
    rows in a serving Milvus collection (random unit vectors, no encoder needed), so the worker's
    item-stats flush does its real Milvus work while behaviour events flow."""
    ns.redis.hset(ns.keys.item_category, mapping={it.item_id: it.category_path[-1] for it in items})
    version = ns.settings.encoder_version
    item_index.create_collection(ns.milvus, ns.settings, version, 384)
    item_index.point_alias(ns.milvus, ns.settings, version)
    rng = np.random.default_rng(0)
    dicts = [{"item_id": it.item_id, "title": it.title, "description": it.description, "brand": it.brand,
              "category_path": list(it.category_path), "price": it.price, "attributes": dict(it.attributes)}
             for it in items]
    from tailbridge.vocab import item_text

    for start in range(0, len(dicts), 1000):
        chunk = dicts[start:start + 1000]
        vectors = rng.standard_normal((len(chunk), 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ns.milvus.insert(item_index.collection_name(ns.settings, version),
                         item_index.rows(chunk, vectors, version, {}, item_text))


def check_publish(report, expected: int, what: str) -> None:
    if report.errors or report.failed or report.total != expected:
        raise BenchError(f"publishing {what}: {report.total} of {expected} acknowledged; "
                         f"failed {dict(report.failed)}; errors {report.errors[:3]}")


def stall_guard(read: Callable[[], int], target: int, stall_s: float, first_timeout_s: float, what: str,
                worker: Worker, on_sample: Callable[[float, int], None], interval: float = 0.02) -> None:
    """Poll a counter until it reaches ``target``: at most ``first_timeout_s`` for the first
    increment, then at most ``stall_s`` without progress."""
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
        worker.check_alive()
        limit = first_timeout_s if value == 0 else stall_s
        if now - (last_change if value else started) > limit:
            raise BenchError(f"{what}: stuck at {value} of {target} for {limit:.0f} s\n"
                             f"--- worker log tail ({worker.log_path}) ---\n{worker.log_tail()}")


# ------------------------------------------------------------------ 1. throughput


def bench_throughput(cfg: Config, base: Settings, workdir: Path, dataset: synth.SynthDataset, run: int) -> dict:
    ns = Namespace(base, workdir, f"tput{run}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "events": cfg.throughput_events}
    try:
        seed_catalog(ns, dataset.items)
        events = list(itertools.islice(simulate(dataset, seed=cfg.seed * 100 + run), cfg.throughput_events))
        if len(events) != cfg.throughput_events:
            raise BenchError(f"the simulator gave {len(events)} events, not {cfg.throughput_events}")
        result["users"] = len({e.user_id for e in events})
        with progress_bar() as progress:
            task = progress.add_task("publishing", total=len(events), info="")
            report = publish(ns.settings, events, on_sent=lambda e: progress.advance(task))
        check_publish(report, len(events), "the throughput events")
        result["publish_s"] = report.seconds
        result["publish_events_per_s"] = len(events) / report.seconds

        worker = ns.worker("throughput")
        samples: list[tuple[float, int]] = []
        worker.start()
        cpu = CpuWindow(worker)
        started_wall = time.time()
        with progress_bar() as progress:
            task = progress.add_task("worker applying", total=len(events), info="(starting)")

            first: list[tuple[float, int]] = []

            def on_sample(at: float, value: int) -> None:
                if value > 0 and not first:
                    first.append((at, value))
                    cpu.start()  # the window starts with the first applied event
                samples.append((at, value))
                rate = f"{(value - first[0][1]) / (at - first[0][0]):,.0f} ev/s" if first and at > first[0][0] else ""
                progress.update(task, completed=value, info=rate)

            stall_guard(ns.applied, len(events), cfg.stall_timeout_s, cfg.startup_timeout_s,
                        "the throughput run", worker, on_sample)
        result["cpu_cores"] = cpu.stop()
        result["memory_worker"] = worker.memory()
        first_at, first_value = next((t, v) for t, v in samples if v > 0)
        last_at = next(t for t, v in samples if v >= len(events))
        result["startup_s"] = first_at - started_wall
        result["first_batch_events"] = first_value
        result["apply_s"] = last_at - first_at
        result["events_per_s"] = (len(events) - first_value) / max(last_at - first_at, 1e-9)
        # Steady-state rate over the middle 10 %..90 % of the events, less sensitive to the ends.
        lo, lo_v = next((t, v) for t, v in samples if v >= 0.1 * len(events))
        hi, hi_v = next((t, v) for t, v in samples if v >= 0.9 * len(events))
        result["events_per_s_10_90"] = (hi_v - lo_v) / max(hi - lo, 1e-9)
        # The second half alone: anything the worker still does at start-up on the side (it loads
        # its encoder on a thread) is over by then.
        mid, mid_v = next((t, v) for t, v in samples if v >= 0.5 * len(events))
        result["events_per_s_second_half"] = (len(events) - mid_v) / max(last_at - mid, 1e-9)
        # Applied events per second since the first applied batch, to see the ramp.
        result["timeline_per_s"] = [
            max(v for t, v in samples if t <= first_at + k + 1) - max(v for t, v in samples if t <= first_at + k)
            for k in range(int(last_at - first_at) + 1)]
        result["duplicates"] = int(ns.redis.get(ns.keys.duplicates) or 0)
        # The Feast row is written just after the Redis commit that moves the counter: wait for
        # the last event's user to show its last interaction, so the rate is not flattered.
        last_ix = next(e for e in reversed(events) if isinstance(e, InteractionEvent) and e.action != "impression")
        last_ms = int(last_ix.event_time.timestamp() * 1000)

        def last_row_visible() -> bool:
            got = ns.store.get_online_features(features=["user_context:recent_action_times_ms"],
                                               entity_rows=[{"user_id": last_ix.user_id}]).to_dict()
            times = got["recent_action_times_ms"][0] or []
            return bool(times) and max(times) >= last_ms

        wait_for(last_row_visible, 30, "the last user's Feast row after the last applied event", worker)
        result["feast_lag_after_counter_s"] = time.time() - last_at
        worker.stop()
        result["memory_worker_final"] = worker.final_memory
        result["worker_log"] = worker.log_summary()
    finally:
        result["cleanup"] = ns.close()
    return result


# ------------------------------------------------------------------ 2. feature freshness


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


class DeliveryProbe(threading.Thread):
    """A passive aiokafka consumer (no group, every partition assigned, ``fetch_max_wait_ms=1500``
    as faust's aiokafka driver sets it) noting when each probe reaches a consumer: the Kafka
    share of feature freshness."""

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
                                    enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=1500,
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


def bench_freshness(cfg: Config, base: Settings, workdir: Path, dataset: synth.SynthDataset, run: int) -> dict:
    ns = Namespace(base, workdir, f"fresh{run}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "rate": cfg.freshness_rate,
                              "seconds": cfg.freshness_seconds, "probe_rate": cfg.probe_rate, "poll_s": cfg.poll_s}
    try:
        seed_catalog(ns, dataset.items)
        total_background = int(cfg.freshness_rate * cfg.freshness_seconds)
        background = list(itertools.islice(simulate(dataset, seed=cfg.seed * 100 + 50 + run), total_background))
        probe_users = [f"probe-{ns.tag}-{k:02d}" for k in range(cfg.probe_users)]
        items = [it.item_id for it in dataset.items]
        feed = ProbeFeed(background, cfg.freshness_rate, cfg.probe_rate, probe_users, items, ns.tag)

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
        warm = [feed.probe(k) for k in range(len(probe_users))]
        check_publish(publish(ns.settings, warm), len(warm), "the warm-up probes")
        warm_ms = {e.user_id: int(e.event_time.timestamp() * 1000) for e in warm}
        with progress_bar() as progress:
            progress.add_task("worker start-up (warm-up probes)", total=None, info="")
            wait_for(lambda: all(visible_times(probe_users).get(u, 0) >= ms for u, ms in warm_ms.items()),
                     cfg.startup_timeout_s, "the warm-up probes to reach Feast", worker, interval=0.2)
        result["startup_s"] = time.monotonic() - started
        applied_before = ns.applied()

        latencies: list[float] = []
        from_event_time: list[float] = []
        sender_report: dict[str, Any] = {}

        def send() -> None:
            sender_report["report"] = publish(ns.settings, feed, rate=cfg.freshness_rate, on_sent=feed.on_sent)

        sender = threading.Thread(target=send, name="publisher", daemon=True)
        expected_total = len(background) + sum(1 for i in range(len(background)) if i % feed.every == feed.every // 2)
        deadline_after_send = None
        with progress_bar() as progress:
            task = progress.add_task(f"{cfg.freshness_rate:,.0f} ev/s + probes", total=expected_total, info="")
            cpu = CpuWindow(worker)
            sender.start()
            while True:
                with feed.lock:
                    users = [u for u, probes in feed.pending.items() if probes]
                if users:
                    seen = visible_times(users)
                    now = time.time()
                    with feed.lock:
                        for user in users:
                            shown = seen.get(user, 0)
                            keep = []
                            for event_ms, sent_wall, _ in feed.pending[user]:
                                if shown >= event_ms:
                                    latencies.append((now - sent_wall) * 1000)
                                    from_event_time.append(now * 1000 - event_ms)
                                else:
                                    keep.append((event_ms, sent_wall, _))
                            feed.pending[user] = keep
                p50 = pct(latencies, 50)
                progress.update(task, completed=feed.count,
                                info=f"probes {len(latencies)}" + (f", p50 {p50:.0f} ms" if p50 else ""))
                worker.check_alive()
                if not sender.is_alive():
                    if deadline_after_send is None:
                        deadline_after_send = time.monotonic() + cfg.stall_timeout_s
                        result["publish_done_at"] = time.time()
                        result["backlog_at_publish_end"] = feed.count - (ns.applied() - applied_before)
                        result["cpu_cores"] = cpu.stop()
                    with feed.lock:
                        left = sum(len(p) for p in feed.pending.values())
                    if not left:
                        break
                    if time.monotonic() > deadline_after_send:
                        raise BenchError(f"{left} probes not visible in Feast {cfg.stall_timeout_s:.0f} s after "
                                         f"the publisher finished\n--- worker log tail ---\n{worker.log_tail()}")
                time.sleep(cfg.poll_s)
        sender.join(5)
        report = sender_report["report"]
        check_publish(report, expected_total, "the freshness stream")
        result["published"] = report.total
        result["publish_events_per_s"] = report.total / report.seconds
        result["publish_s"] = report.seconds
        # Did the worker keep up? Wait for the applied counter to cover the whole stream.
        target = applied_before + report.total
        wait_for(lambda: ns.applied() >= target, cfg.stall_timeout_s, "the freshness stream to be applied", worker)
        result["drain_after_publish_s"] = time.time() - result.pop("publish_done_at")
        result["probes"] = latency_summary(latencies)
        wait_for(lambda: all(i in delivery.received for i in feed.sent), 30,
                 "the delivery probe consumer to see every probe")
        delivery.stop_flag.set()
        delivery.join(10)
        kafka_ms = [(delivery.received[i] - sent_wall) * 1000 for i, (_, _, sent_wall) in feed.sent.items()]
        result["kafka_delivery"] = latency_summary(kafka_ms)
        result["probes_from_event_time"] = latency_summary(from_event_time)
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        result["poll_ms_median"] = (pct(poll_times, 50) or 0) * 1000
        result["memory_worker"] = worker.memory()
        worker.stop()
        result["memory_worker_final"] = worker.final_memory
        result["worker_log"] = worker.log_summary()
    finally:
        result["cleanup"] = ns.close()
    return result


# ------------------------------------------------------------------ 3. vector freshness


def bench_vectors(cfg: Config, base: Settings, workdir: Path, dataset: synth.SynthDataset, run: int) -> dict:
    ns = Namespace(base, workdir, f"vec{run}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "rate": cfg.vector_rate,
                              "seconds": cfg.vector_seconds, "catalog_items": cfg.catalog_items, "poll_s": cfg.poll_s}
    try:
        base_events = list(itertools.islice(catalog_events(dataset), cfg.catalog_items))
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

            stall_guard(lambda: ns.redis.hlen(ns.keys.item_category), len(base_events), cfg.stall_timeout_s,
                        cfg.startup_timeout_s, "indexing the catalog", worker, on_sample, interval=0.1)
        first_at, first_value = next((t, v) for t, v in samples if v > 0)
        last_at = samples[-1][0]
        result["catalog_startup_s"] = first_at - started_wall
        result["catalog_index_items_per_s"] = (len(base_events) - first_value) / max(last_at - first_at, 1e-9)
        alias = item_index.alias_name(ns.settings)
        count = item_index.count(ns.milvus, alias)
        if count != len(base_events):
            wait_for(lambda: item_index.count(ns.milvus, alias) == len(base_events), 30,
                     f"Milvus to hold the {len(base_events)} catalog rows (has {count})", worker)

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

        sender_report: dict[str, Any] = {}
        sender = threading.Thread(target=lambda: sender_report.update(
            report=publish(ns.settings, updates(), rate=cfg.vector_rate, on_sent=on_sent)), daemon=True)
        deadline_after_send = None
        with progress_bar() as progress:
            task = progress.add_task(f"{cfg.vector_rate:.0f} catalog updates/s", total=total, info="")
            cpu = CpuWindow(worker)
            sender.start()
            while True:
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
                progress.update(task, completed=sent_count[0],
                                info=f"seen {len(latencies)}" + (f", p50 {p50:.0f} ms" if p50 else ""))
                worker.check_alive()
                if not sender.is_alive():
                    if deadline_after_send is None:
                        result["cpu_cores"] = cpu.stop()
                    deadline_after_send = deadline_after_send or time.monotonic() + cfg.stall_timeout_s
                    with lock:
                        left = sum(len(p) for p in pending.values())
                    if not left:
                        break
                    if time.monotonic() > deadline_after_send:
                        raise BenchError(f"{left} catalog updates not visible in Milvus {cfg.stall_timeout_s:.0f} s "
                                         f"after the publisher finished\n--- worker log tail ---\n{worker.log_tail()}")
                time.sleep(cfg.poll_s)
        sender.join(5)
        report = sender_report["report"]
        check_publish(report, total, "the catalog updates")
        result["published"] = report.total
        result["publish_updates_per_s"] = report.total / report.seconds
        result["updates"] = latency_summary(latencies)
        # What the worker sustained: all updates from the first send to the last one visible.
        result["worker_updates_per_s"] = total / max(marks["last_visible"] - marks["first_sent"], 1e-9)
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        result["query_ms_median"] = (pct(query_times, 50) or 0) * 1000
        result["memory_worker"] = worker.memory()
        worker.stop()
        result["memory_worker_final"] = worker.final_memory
        result["worker_log"] = worker.log_summary()
    finally:
        result["cleanup"] = ns.close()
    return result


# ------------------------------------------------------------------ 5. consume (no-op faust agent)

NOOP_OUT, NOOP_MARKER = "TB_BENCH_NOOP_OUT", "TB_BENCH_NOOP_MARKER"


def noop_worker_main() -> None:
    """`bench/streams.py _noop-worker`: the worker's faust app (``streams.app.faust_app``: same
    broker, batching and consumer settings), whose behaviour agent only
    decodes each batch (as the worker's ``parse`` does) and notes it in a JSON-lines file: no
    Redis, no Feast. What it reaches is the ceiling set by faust + aiokafka + the broker."""
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


def bench_consume(cfg: Config, base: Settings, workdir: Path, dataset: synth.SynthDataset, run: int) -> dict:
    ns = Namespace(base, workdir, f"noop{run}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "events": cfg.throughput_events}
    try:
        events = list(itertools.islice(simulate(dataset, seed=cfg.seed * 100 + run), cfg.throughput_events))
        check_publish(publish(ns.settings, events), len(events), "the consume events")
        out = workdir / "workers" / f"{ns.tag}-noop.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        marker = f'"probe-{ns.tag}-'
        worker = ns.worker("noop", argv=[sys.executable, str(Path(__file__).resolve()), "_noop-worker"],
                           env={NOOP_OUT: str(out), NOOP_MARKER: marker})
        tail = JsonlTail(out)
        worker.start()
        cpu = CpuWindow(worker)
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

        # Latency at the freshness phase's rate, with the same probes: Kafka + faust, no processing.
        background = list(itertools.islice(simulate(dataset, seed=cfg.seed * 100 + 60 + run),
                                           int(cfg.freshness_rate * cfg.freshness_seconds)))
        probe_users = [f"probe-{ns.tag}-{k:02d}" for k in range(cfg.probe_users)]
        feed = ProbeFeed(background, cfg.freshness_rate, cfg.probe_rate, probe_users,
                         [it.item_id for it in dataset.items], ns.tag)
        batches_before = len(tail.batches)
        with progress_bar() as progress:
            task = progress.add_task(f"{cfg.freshness_rate:,.0f} ev/s + probes to the no-op agent",
                                     total=len(background), info="")

            def on_sent(event) -> None:
                feed.on_sent(event)
                progress.update(task, completed=feed.count)

            report = publish(ns.settings, feed, rate=cfg.freshness_rate, on_sent=on_sent)
        if report.errors or report.failed:
            raise BenchError(f"publishing to the no-op agent: {report.errors[:3]}")
        wait_for(lambda: tail.poll() is not None and all(i in tail.probes for i in feed.sent), cfg.stall_timeout_s,
                 "the no-op agent to see every probe", worker, interval=0.1)
        latencies = [(tail.probes[i] - sent_wall) * 1000 for i, (_, _, sent_wall) in feed.sent.items()]
        result["probes"] = latency_summary(latencies)
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        result["median_batch_at_rate"] = statistics.median(tail.batches[batches_before:] or [0])
        result["memory_worker"] = worker.memory()
        worker.stop()
        result["memory_worker_final"] = worker.final_memory
        result["worker_log"] = worker.log_summary()
    finally:
        result["cleanup"] = ns.close()
    return result


# ------------------------------------------------------------------ 4. stages (in-process)


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


def bench_stages(cfg: Config, base: Settings, workdir: Path, dataset: synth.SynthDataset, run: int) -> dict:
    import torch

    torch.set_num_threads(1)  # as the worker runs (OMP_NUM_THREADS=1)
    from tailbridge.models.retrieval.encoders import load_encoder
    from tailbridge.streams.indexer import Indexer

    result: dict[str, Any] = {}
    # -- behaviour: BehaviourProcessor.process on 500-event batches
    ns = Namespace(base, workdir, f"stage{run}")
    try:
        seed_catalog(ns, dataset.items)
        processor = BehaviourProcessor(ns.settings, ns.redis, ns.store)
        bucket: dict[str, float] = {}
        for name in ("_fold", "_stage_writes", "_write_user_rows"):
            _timed(processor, name, bucket)
        _timed(ns.store, "write_to_online_store", bucket)
        batch_size = ns.settings.worker_batch_size
        stream = simulate(dataset, seed=cfg.seed * 100 + 80 + run)
        allowed = TOPICS["queries"].events + TOPICS["interactions"].events
        rows = []
        with progress_bar() as progress:
            task = progress.add_task(f"BehaviourProcessor x {batch_size}", total=cfg.behaviour_batches + 1, info="")
            for n in range(cfg.behaviour_batches + 1):  # the first batch is a warm-up
                raw = [encode(e) for e in itertools.islice(stream, batch_size)]
                bucket.clear()
                t = time.perf_counter()
                events = [decode(r, allowed=allowed) for r in raw]
                decode_s = time.perf_counter() - t
                res = processor.process(events)
                if n == 0:
                    progress.advance(task)
                    continue
                fold, stage = bucket.get("_fold", 0.0), bucket.get("_stage_writes", 0.0)
                feast_total, feast_write = bucket.get("_write_user_rows", 0.0), bucket.get("write_to_online_store", 0.0)
                rows.append({
                    "decode_ms": decode_s * 1000,
                    "redis_round_trips_ms": (res.timings["redis_s"] - fold - stage) * 1000,
                    "fold_ms": fold * 1000,
                    "stage_writes_ms": stage * 1000,
                    "feast_rows_ms": (feast_total - feast_write) * 1000,
                    "feast_write_ms": feast_write * 1000,
                    "total_ms": (decode_s + res.timings["total_s"]) * 1000,
                    "users": res.users_written,
                })
                progress.advance(task)
            # The worker's flush timer (every worker_flush_seconds, on a thread beside the batches).
            bucket.clear()
            _timed(ns.milvus, "query", bucket)
            _timed(ns.milvus, "upsert", bucket)
            t = time.perf_counter()
            flushed = processor.flush_item_stats(ns.milvus)
            result["item_stats_flush"] = {
                "items": flushed, "ms": (time.perf_counter() - t) * 1000,
                "feast_write_ms": bucket.get("write_to_online_store", 0.0) * 1000,
                "milvus_query_ms": bucket.get("query", 0.0) * 1000,
                "milvus_upsert_ms": bucket.get("upsert", 0.0) * 1000}
        result["behaviour_batch"] = {k: pct([r[k] for r in rows], 50) for k in rows[0]}
        result["behaviour_batch"]["batch_size"] = batch_size
        result["behaviour_batch"]["events_per_s_in_process"] = batch_size / (result["behaviour_batch"]["total_ms"] / 1000)
    finally:
        result["cleanup_behaviour"] = ns.close()

    # -- indexer: Indexer.process on 50-item batches
    ns = Namespace(base, workdir, f"stagei{run}")
    try:
        indexer = Indexer(ns.settings, ns.milvus, ns.redis, load_encoder)
        bucket = {}
        _timed(ns.milvus, "upsert", bucket)
        _timed(indexer, "_stats", bucket)
        _timed(indexer, "live", bucket)
        items = list(catalog_events(dataset))
        rows = []
        per = 50
        with progress_bar() as progress:
            task = progress.add_task(f"Indexer x {per}", total=cfg.index_batches + 1, info="(model load)")
            for n in range(cfg.index_batches + 1):  # the first batch loads the model, creates the collection
                chunk = items[n * per:(n + 1) * per]
                raw = [encode(e) for e in chunk]
                bucket.clear()
                t = time.perf_counter()
                events = [decode(r, allowed=TOPICS["catalog"].events) for r in raw]
                decode_s = time.perf_counter() - t
                res = indexer.process(events)
                progress.update(task, advance=1, info="")
                if n == 0:
                    result["indexer_first_batch_s"] = res.timings["total_s"]
                    continue
                encode_s, upsert = res.timings.get("encode_s", 0.0), bucket.get("upsert", 0.0)
                stats, live = bucket.get("_stats", 0.0), bucket.get("live", 0.0)
                rows.append({
                    "decode_ms": decode_s * 1000,
                    "encode_ms": encode_s * 1000,
                    "milvus_upsert_ms": upsert * 1000,
                    "redis_stats_ms": stats * 1000,
                    "live_collections_ms": live * 1000,
                    "rows_and_redis_ms": (res.timings["total_s"] - encode_s - upsert - stats - live) * 1000,
                    "total_ms": (decode_s + res.timings["total_s"]) * 1000,
                })
        result["index_batch"] = {k: pct([r[k] for r in rows], 50) for k in rows[0]}
        result["index_batch"]["batch_size"] = per
        result["index_batch"]["items_per_s_in_process"] = per / (result["index_batch"]["total_ms"] / 1000)
    finally:
        result["cleanup_indexer"] = ns.close()
    return result


# ------------------------------------------------------------------ reporting


def fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


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
    ("consume: no-op agent probe p50 at 1,000/s", "consume.probes.p50_ms", " ms", 0, None),
    ("consume: no-op agent probe p99 at 1,000/s", "consume.probes.p99_ms", " ms", 0, None),
    ("consume: no-op agent median batch at 1,000/s", "consume.median_batch_at_rate", "", 0, None),
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


def print_results(cfg: Config, runs: list[dict], summary: dict, verdict: dict, stack_memory: dict) -> None:
    table = Table(title="tailbridge stream worker benchmark" + (" (--quick)" if cfg.quick else ""), show_lines=False)
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
        table.add_row(label, *(fmt(v, unit, digits) for v in values), fmt(median, unit, digits), target_text, cell)
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
        mem.add_row(name, fmt(m and m["peak_mib"], "", 0), fmt(m and m["rss_mib"], "", 0))
    for i, r in enumerate(runs):
        for phase in ("throughput", "freshness", "vectors", "consume"):
            m = get(r, f"{phase}.memory_worker_final") or get(r, f"{phase}.memory_worker")
            if m:
                mem.add_row(f"worker ({phase}, run {i + 1})", fmt(m["peak_mib"]), fmt(m["rss_mib"]))
    console.print(mem)

    cpu = Table(title="CPU during each measured window (cores; the machine has "
                      f"{os.cpu_count()}; 'others' = processes that are not this benchmark's)")
    names = ["worker", "kafka", "redis", "milvus", "bench", "others", "machine"]
    cpu.add_column("window")
    for name in names:
        cpu.add_column(name, justify="right")
    cpu.add_column("seconds", justify="right")
    for i, r in enumerate(runs):
        for phase in ("throughput", "freshness", "vectors", "consume"):
            c = get(r, f"{phase}.cpu_cores")
            if c:
                cpu.add_row(f"{phase}, run {i + 1}", *(fmt(c.get(n), "", 2) for n in names), fmt(c["window_s"], "", 1))
    if cpu.row_count:
        console.print(cpu)


# ------------------------------------------------------------------ main


PHASES = {"throughput": bench_throughput, "freshness": bench_freshness, "vectors": bench_vectors,
          "stages": bench_stages, "consume": bench_consume}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every phase (default 3)")
    parser.add_argument("--json", type=Path, help="write every number (per run and across runs) here")
    parser.add_argument("--quick", action="store_true", help="5,000 events, 8 s streams, smaller catalog")
    parser.add_argument("--events", type=int, help="events for the throughput phase (default 30,000; quick 5,000)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma separated subset of {','.join(PHASES)}")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", help="use this Redis instead of starting an embedded redis-server")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Settings field for every namespace, for what-if runs "
                             "(e.g. --set worker_flush_seconds=3600); the default measures the defaults")
    args = parser.parse_args(argv)
    cfg = make_config(args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")

    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or field not in Settings.model_fields:
            parser.error(f"--set wants FIELD=VALUE with a Settings field, got {item!r}")
        overrides[field] = value
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    rid = uuid.uuid4().hex[:6]
    base = Settings(
        state_dir=workdir / "state", data_dir=workdir / "data",
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", milvus_uri=f"http://127.0.0.1:{stack.free_port()}",
        # A port nothing answers on, so `stack up` starts a redis-server of our own (isolated, measurable).
        redis_url=args.redis_url or f"redis://127.0.0.1:{stack.free_port()}/0", online_store="redis",
        feast_project=f"tbbench_{rid}", topic_prefix=f"tbbench-{rid}", **overrides,
    )
    meta = {"started": datetime.now(UTC).isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg(), "config": asdict(cfg),
            "phases": phases, "workdir": str(workdir), "settings_overrides": overrides,
            "worker_settings": {k: v for k, v in base.model_dump().items() if k.startswith("worker_")},
            "code": code_version()}
    console.print(f"[bold]tailbridge stream benchmark[/]: {cfg.runs} run(s), phases {', '.join(phases)}"
                  f"{' (quick)' if cfg.quick else ''}; {os.cpu_count()} CPUs, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; work dir {workdir}"
                  + (f"; [yellow]settings overridden: {overrides}[/]" if overrides else ""))
    runs: list[dict] = []
    errors: list[str] = []
    stack_pids: dict[str, int | None] = {}
    stack_memory: dict[str, dict | None] = {}
    with ExitStack() as cleanup:
        def remove_workdir() -> None:
            if args.keep:
                console.print(f"kept {workdir}")
            elif errors or log_problems(runs):  # keep the logs to read, not the data
                shutil.rmtree(workdir / "state" / "milvus", True)
                shutil.rmtree(workdir / "data", True)
                console.print(f"kept the logs in {workdir} (a phase failed or a worker logged retries)")
            else:
                shutil.rmtree(workdir, True)

        cleanup.callback(remove_workdir)
        cleanup.callback(stack.down, base)
        with console.status("starting the embedded stack (Tansu, redis-server, Milvus Lite)"):
            statuses = stack.up(base)
        for s in statuses:
            console.print(f"  {s.name:6} {s.mode:9} {s.address} {s.detail}")
            stack_pids[s.name] = s.pid if s.mode == "embedded" else None
        STACK_PIDS.update(stack_pids)
        meta["stack"] = [asdict(s) for s in statuses]
        with console.status("generating the demo dataset"):
            dataset = synth.generate(items=cfg.dataset_items, users=cfg.dataset_users, seed=cfg.seed)
        for run in range(cfg.runs):
            result: dict[str, Any] = {"run": run + 1}
            for phase in phases:
                console.rule(f"run {run + 1}/{cfg.runs}: {phase}")
                started = time.monotonic()
                try:
                    result[phase] = PHASES[phase](cfg, base, workdir, dataset, run)
                except (BenchError, stack.StackError) as exc:
                    result[phase] = {"error": str(exc)}
                    errors.append(f"run {run + 1} {phase}: {exc}")
                    console.print(f"[red]{phase} failed:[/] {exc}")
                except Exception as exc:  # noqa: BLE001  record, go on to the next phase
                    result[phase] = {"error": traceback.format_exc()}
                    errors.append(f"run {run + 1} {phase}: {exc!r}")
                    console.print(f"[red]{phase} failed:[/]\n{traceback.format_exc()}")
                result[phase]["phase_s"] = time.monotonic() - started
                result[phase]["stack_memory"] = {n: memory_of(p) for n, p in stack_pids.items()}
                console.print(f"  {phase} done in {result[phase]['phase_s']:.0f} s: " + brief(phase, result[phase]))
            runs.append(result)
        stack_memory = {n: memory_of(p) for n, p in stack_pids.items()}
        # The stack and the workers are children of this process: count it alone.
        stack_memory["bench process (in-process stages)"] = memory_of(os.getpid(), tree=False)

    summary = summarise(runs)
    verdict = verdicts(summary)
    meta["loadavg_end"] = os.getloadavg()
    meta["finished"] = datetime.now(UTC).isoformat()
    print_results(cfg, runs, summary, verdict, stack_memory)
    for line in diagnose(runs, summary, verdict):
        console.print(line)
    if errors:
        console.print(f"[red]{len(errors)} phase(s) failed[/]: " + "; ".join(e.splitlines()[0] for e in errors))
    console.print("[dim]The machine is shared: numbers are noisy (load average "
                  f"{' '.join(f'{x:.2f}' for x in meta['loadavg_start'])} at start, "
                  f"{' '.join(f'{x:.2f}' for x in meta['loadavg_end'])} at end).[/]")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "targets": verdict, "summary": summary, "runs": runs,
                                         "stack_memory": stack_memory, "errors": errors}, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 1 if errors else 0


def code_version() -> dict:
    """The commit and whether the worker's code differs from it: the numbers describe the code
    on disk when each worker started."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "streams", "feature_repo", "infra", "tailbridge", "models/encoders.py")
    import hashlib

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(diff),
            "uncommitted_files": git("diff", "HEAD", "--name-only", "--", "streams", "feature_repo", "infra",
                                     "tailbridge", "models/encoders.py").splitlines(),
            "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}


def log_problems(runs: list[dict]) -> bool:
    logs = [get(r, f"{phase}.worker_log") for r in runs for phase in ("throughput", "freshness", "vectors", "consume")]
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
        return (f"no-op faust agent: {r['events_per_s']:,.0f} events/s; at {1000:,} ev/s probes p50 "
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
        for phase in ("throughput", "freshness", "vectors", "consume"):
            log = get(r, f"{phase}.worker_log")
            if log and (log["retries"] or log["tracebacks"] or log["errors"] or log["overlapping_timers"]):
                lines.append(f"run {r['run']} {phase} worker log: {log['retries']} retries, {log['tracebacks']} "
                             f"tracebacks, {log['errors']} errors, {log['overlapping_timers']} 'timer is overlapping' "
                             f"warnings (the item-stats flush took longer than worker_flush_seconds) - {log['log']}")
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["_noop-worker"]:
        noop_worker_main()
    else:
        sys.exit(main())
