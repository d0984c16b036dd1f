"""Throughput: N simulated behaviour events are published first (the publish rate), then a
worker is started and the rate of the Redis ``applied`` counter is taken from its first to
its last applied event (worker start-up excluded), then the last user's Feast row must show
the last event (so the rate is not flattered by a Feast write still to come)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from tailbridge.bench.common import BenchError, progress_bar, wait_until
from tailbridge.bench.stream_phases.namespace import Namespace, Setup, check_publish, finish_worker, seed_catalog, \
    stall_guard
from tailbridge.streams.events import InteractionEvent
from tailbridge.synthetic.replay import publish
from tailbridge.synthetic.shoppers import simulate


def run(setup: Setup, run_index: int) -> dict:
    cfg, dataset = setup.cfg, setup.dataset
    ns = Namespace(setup, f"tput{run_index}")
    result: dict[str, Any] = {"namespace": ns.settings.topic_prefix, "events": cfg.throughput_events}
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

        worker = ns.worker("throughput")
        samples: list[tuple[float, int]] = []
        worker.start()
        cpu = ns.cpu_window(worker)
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
        result.update(rates(samples, len(events)))
        last_at = next(t for t, v in samples if v >= len(events))
        result["startup_s"] = next(t for t, v in samples if v > 0) - started_wall
        result["duplicates"] = int(ns.redis.get(ns.keys.duplicates) or 0)
        # The Feast row is written just after the Redis commit that moves the counter: wait for
        # the last event's user to show its last interaction.
        last_ix = next(e for e in reversed(events) if isinstance(e, InteractionEvent) and e.action != "impression")
        last_ms = int(last_ix.event_time.timestamp() * 1000)

        def last_row_visible() -> bool:
            got = ns.store.get_online_features(features=["user_context:recent_action_times_ms"],
                                               entity_rows=[{"user_id": last_ix.user_id}]).to_dict()
            times = got["recent_action_times_ms"][0] or []
            return bool(times) and max(times) >= last_ms

        wait_until(last_row_visible, 30, "the last user's Feast row after the last applied event", 0.05, worker)
        result["feast_lag_after_counter_s"] = time.time() - last_at
        finish_worker(result, worker)
    finally:
        result["cleanup"] = ns.close()
    return result


def rates(samples: list[tuple[float, int]], total: int) -> dict:
    """Applied events/s from (wall time, applied counter) samples: first to last applied
    batch, 10 % to 90 % of the events (less sensitive to the ends), the second half alone
    (anything the worker still does at start-up on the side, such as loading its encoder, is
    over by then), and per second since the first applied batch (the ramp)."""
    first_at, first_value = next((t, v) for t, v in samples if v > 0)
    last_at = next(t for t, v in samples if v >= total)
    lo, lo_v = next((t, v) for t, v in samples if v >= 0.1 * total)
    hi, hi_v = next((t, v) for t, v in samples if v >= 0.9 * total)
    mid, mid_v = next((t, v) for t, v in samples if v >= 0.5 * total)
    return {
        "first_batch_events": first_value,
        "apply_s": last_at - first_at,
        "events_per_s": (total - first_value) / max(last_at - first_at, 1e-9),
        "events_per_s_10_90": (hi_v - lo_v) / max(hi - lo, 1e-9),
        "events_per_s_second_half": (total - mid_v) / max(last_at - mid, 1e-9),
        "timeline_per_s": [
            max(v for t, v in samples if t <= first_at + k + 1) - max(v for t, v in samples if t <= first_at + k)
            for k in range(int(last_at - first_at) + 1)],
    }
