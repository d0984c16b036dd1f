"""Throughput: N simulated behaviour events are published first (the publish rate), then W
workers are started together (``--workers``, default 2; they share the partitions) and the
rate of the Redis ``applied`` counter is taken from the first to the last applied event
(worker start-up excluded), and from the moment the last worker joined the group (each
worker's last assignment of the behaviour topics in its log: the batch consumer's final
rebalance) to the last event: the rate with all W applying. Then the last user's Feast row must show the last event (so the rate is
not flattered by a write still to come)."""

from __future__ import annotations

import itertools
import re
import time
from datetime import datetime
from typing import Any

from tailbridge.bench.common import CLI, BenchError, Worker, progress_bar, wait_until
from tailbridge.bench.stream_phases.namespace import Namespace, Setup, check_publish, finish_worker, seed_catalog, \
    stall_guard
from tailbridge.streams.batch_consumer import ASSIGNED
from tailbridge.streams.events import InteractionEvent
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import simulate

CPU_EVERY_S = 0.5
# The behaviour topics' batch consumer logs this (at info) when a rebalance has given it its partitions.
RESUMED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[INFO\] behaviour: "
                     + re.escape(ASSIGNED))


def run(setup: Setup, run_index: int) -> dict:
    cfg, dataset = setup.cfg, setup.dataset
    ns = Namespace(setup, f"tput{run_index}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "events": cfg.throughput_events,
                              "workers": cfg.throughput_workers}
    try:
        seed_catalog(ns, dataset.items)
        events = list(itertools.islice(simulate(dataset, seed=cfg.seed * 100 + run_index), cfg.throughput_events))
        if len(events) != cfg.throughput_events:
            raise BenchError(f"the simulator gave {len(events)} events, not {cfg.throughput_events}")
        result["users"] = len({e.user_id for e in events})
        with progress_bar() as progress:
            task = progress.add_task("publishing", total=len(events), info="")
            report = publish(ns.settings, events, on_sent=lambda e: progress.advance(task))
        check_publish(report, len(events), "the throughput events")
        result["publish_s"] = report.seconds
        result["publish_events_per_s"] = len(events) / report.seconds

        workers = [ns.worker(f"throughput-{k + 1}", argv=[CLI, "worker", "--loglevel", "info"])
                   for k in range(cfg.throughput_workers)]
        samples: list[tuple[float, int]] = []
        snapshots: list[tuple[float, tuple]] = []  # (wall time, CPU counters), every CPU_EVERY_S
        for worker in workers:
            worker.start()
        cpu = ns.cpu_window(workers)
        started_wall = time.time()
        with progress_bar() as progress:
            task = progress.add_task(f"{len(workers)} worker(s) applying", total=len(events), info="(starting)")
            first: list[tuple[float, int]] = []

            def on_sample(at: float, value: int) -> None:
                if value > 0 and not first:
                    first.append((at, value))
                    cpu.start()  # the window starts with the first applied event
                if first and (not snapshots or at - snapshots[-1][0] >= CPU_EVERY_S or value >= len(events)):
                    snapshots.append((at, cpu.snapshot()))
                samples.append((at, value))
                rate = f"{(value - first[0][1]) / (at - first[0][0]):,.0f} ev/s" if first and at > first[0][0] else ""
                progress.update(task, completed=value, info=rate)

            stall_guard(ns.applied, len(events), cfg.stall_timeout_s, cfg.startup_timeout_s,
                        "the throughput run", workers, on_sample)
        result["cpu_cores_from_first"] = cpu.stop()
        last_at = next(t for t, v in samples if v >= len(events))
        joined = [last_resumed(worker, last_at) for worker in workers]
        result["all_joined_after_s"] = (max(joined) - started_wall) if None not in joined else None
        result.update(rates(samples, len(events), max(joined) if None not in joined else None))
        # CPU while every worker applied (start-ups and rebalances left out), else from the first event.
        since = next((snap for at, snap in snapshots if None not in joined and at >= max(joined)), None)
        result["cpu_cores"] = cpu.between(since, snapshots[-1][1]) if since and since is not snapshots[-1][1] \
            else result["cpu_cores_from_first"]
        # The target's rate: with every worker applying, unless the events ran out before the last joined.
        all_workers = result["events_per_s_all_workers"]
        result["target_events_per_s"] = all_workers if all_workers is not None else result["events_per_s"]
        result["target_rate_basis"] = "all workers joined" if all_workers is not None else "first to last"
        result["startup_s"] = next(t for t, v in samples if v > 0) - started_wall
        result["duplicates"] = int(ns.redis.get(ns.keys.duplicates) or 0)
        # The Feast row is written in the Redis transaction that moves the counter; check that the
        # last event's user shows its last interaction.
        last_ix = next(e for e in reversed(events) if isinstance(e, InteractionEvent) and e.action != "impression")
        last_ms = int(last_ix.event_time.timestamp() * 1000)

        def last_row_visible() -> bool:
            got = ns.store.get_online_features(features=["user_context:recent_action_times_ms"],
                                               entity_rows=[{"user_id": last_ix.user_id}]).to_dict()
            times = got["recent_action_times_ms"][0] or []
            return bool(times) and max(times) >= last_ms

        wait_until(last_row_visible, 30, "the last user's Feast row after the last applied event", 0.05, workers[0])
        result["feast_lag_after_counter_s"] = time.time() - last_at
        finish_worker(result, workers)
    finally:
        result["cleanup"] = ns.close()
    return result


def last_resumed(worker: Worker, before: float) -> float | None:
    """When the worker last resumed after a rebalance (epoch s), up to ``before``; None if never."""
    text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
    times = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
             for m in map(RESUMED.match, text.splitlines()) if m]
    times = [t for t in times if t <= before]
    return max(times) if times else None


def rates(samples: list[tuple[float, int]], total: int, all_joined: float | None) -> dict:
    """Applied events/s from (wall time, applied counter) samples: first to last applied
    batch, 10 % to 90 % of the events (less sensitive to the ends), from when the last worker
    joined (every worker applying; None if the events ran out first), and per second since
    the first applied batch (the ramp)."""
    first_at, first_value = next((t, v) for t, v in samples if v > 0)
    last_at = next(t for t, v in samples if v >= total)
    lo, lo_v = next((t, v) for t, v in samples if v >= 0.1 * total)
    hi, hi_v = next((t, v) for t, v in samples if v >= 0.9 * total)
    joined = next(((t, v) for t, v in samples if all_joined is not None and t >= all_joined and v < total), None)
    return {
        "first_batch_events": first_value,
        "apply_s": last_at - first_at,
        "events_per_s": (total - first_value) / max(last_at - first_at, 1e-9),
        "events_per_s_10_90": (hi_v - lo_v) / max(hi - lo, 1e-9),
        "events_per_s_all_workers": (total - joined[1]) / max(last_at - joined[0], 1e-9) if joined else None,
        "events_after_all_joined": total - joined[1] if joined else 0,
        "timeline_per_s": [
            max(v for t, v in samples if t <= first_at + k + 1) - max(v for t, v in samples if t <= first_at + k)
            for k in range(int(last_at - first_at) + 1)],
    }
