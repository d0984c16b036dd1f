"""The drift monitor (streams/monitor): detection delay per drift kind, false alarms without
drift, cost and memory, in stream time at a fixed event rate.

    .venv/bin/python -m tailbridge.bench.monitor [--runs 3] [--rate 1000] [--no-drift-minutes 30]
                                                 [--embedder minilm|hashed] [--feature-sample 64]
                                                 [--json out.json] [--smoke]

Each run simulates the demo's shopper stream (``tailbridge.synthetic``; a 5,000-item demo data
set, a new seed per run) with event times ``1 / rate`` apart, and feeds it to one in-process
``Monitor`` with the production configuration (10 s buckets, windows of 10 s and 60 s, 60 s of
warm-up, 300 s of reference). At T = 120 s after the reference is pinned the monitor is copied
once per drift kind (``synthetic.drift``: taste, vocab, missing, constant, model; and two broken
Feast features: ``feature-missing``, item_stats ctr_24h written empty, ``feature-constant``,
user_context recent_item_ids stuck at its default, the empty list) and each copy reads the
drifted stream until its first alert (at most ``--max-delay`` s): the detection delay is the end
of the first alerting window minus T.

Feature rows: the monitor reads ``--feature-sample`` users' and items' rows per bucket, as its
processor does from Redis; here ``synthetic.drift.FeatureRows`` keeps the rows the worker would
write in memory (warmed by 5 minutes of stream before the monitor starts, the worker's clock
running fast so that a day is 5 s of stream time: 24 h counts and affinities in their steady
state). Building them is the worker's work and is not timed; reading them is the monitor's and is. The original reads ``--no-drift-minutes`` more
of the undrifted stream: its alerts are false alarms, and the share of evaluated windows with any
alert is the measured per-window false-alarm rate (the calibrated one is ``alpha_window``).

Cost: CPU seconds (this process) spent inside the monitor per event, so events/s on one core,
with and without decoding the event from its JSON bytes first (the stream worker decodes before
the processor sees it). Memory: the size of the monitor's state (pickled) at each 10 minutes of
the no-drift stream, which must not grow with its length.

``--smoke``: a 300-item data set at 200 events/s with 1 s buckets, a few minutes of stream time
and hashed-trigram query vectors, to check the benchmark works (its numbers are no measurement).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import pickle
import statistics
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.table import Table
from tailbridge.bench.common import console, fmt, run_meta, write_json
from tailbridge.streams.events import decode, encode
from tailbridge.streams.monitor.core import FeatureObservation, Monitor, MonitorConfig
from tailbridge.streams.monitor.features import FEATURES

from tailbridge.synthetic import catalog as synth
from tailbridge.synthetic.drift import KINDS, FeatureRows, drifted
from tailbridge.synthetic.shoppers import simulate

# broken Feast features: (view, feature, how)
FEATURE_KINDS = {"feature-missing": ("item_stats", "ctr_24h", "missing"),
                 "feature-constant": ("user_context", "recent_item_ids", "constant")}
ALL_KINDS = KINDS + tuple(FEATURE_KINDS)
# broken fields and features; every other kind 120 s
TARGET_DELAY_S = {"missing": 30.0, "constant": 30.0, "feature-missing": 30.0, "feature-constant": 30.0}
DEFAULT_TARGET_S = 120.0
TARGET_EVENTS_PER_S = 10_000


class Clock:
    """Event times ``1 / rate`` apart from ``start``: stream time at exactly that rate."""

    def __init__(self, start: datetime, rate: float):
        self.now, self.step = start, timedelta(seconds=1 / rate)

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


class Timed:
    """A monitor and the CPU time spent in it (events and the feature rows read for them, per event)."""

    def __init__(self, monitor: Monitor):
        self.monitor, self.cpu_s, self.events = monitor, 0.0, 0

    def feed(self, events) -> list:
        started = time.process_time()
        reports = []
        for event in events:
            reports.extend(self.monitor.observe(event))
        self.cpu_s += time.process_time() - started
        self.events += sum(not isinstance(e, FeatureObservation) for e in events)
        return reports


def with_rows(events, rows: FeatureRows | None):
    """Each event, then the feature rows the monitor's processor would read for it."""
    for event in events:
        yield event
        if rows is not None:
            yield from rows.observe(event)


def state_bytes(monitor: Monitor) -> int:
    embed, monitor.embed = monitor.embed, None  # the encoder is the model, not the monitor's state
    try:
        return len(pickle.dumps(monitor))
    finally:
        monitor.embed = embed


def chunks(events, size: int = 5000):
    while batch := list(itertools.islice(events, size)):
        yield batch


def detect(snapshot: Monitor, rows: FeatureRows | None, kind: str, dataset, seed: int, t_drift: datetime, rate: float,
           max_delay_s: float) -> dict:
    monitor = copy.deepcopy(snapshot, {id(snapshot.embed): snapshot.embed})  # the encoder is shared, not copied
    rows = copy.deepcopy(rows)
    clock = Clock(t_drift, rate)
    limit = t_drift + timedelta(seconds=max_delay_s)
    if kind in FEATURE_KINDS:
        if rows is None:
            return {"delay_s": None, "alerts": [], "skipped": "no feature rows (--feature-sample 0)"}
        rows.break_feature(*FEATURE_KINDS[kind])
        events = simulate(dataset, seed=seed, clock=clock)
    else:
        events = drifted(kind, dataset, seed, clock)
    for batch in chunks(with_rows(events, rows), 1000):
        for report in monitor.observe_all(batch):
            if report.alerts:
                delay = report.end_ms / 1000 - t_drift.timestamp()
                return {"delay_s": delay, "alerts": [f"{a.metric}@{a.window}" for a in report.alerts]}
        if clock.now > limit:
            break
    return {"delay_s": None, "alerts": []}


def one_run(run: int, dataset, config: MonitorConfig, embed, rate: float, no_drift_min: float, after_pin_s: float,
            max_delay_s: float, decode_sample: int, feature_sample: int, warm_s: float, day_s: float) -> dict:
    seed = 1000 + run
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=run)
    rows = None
    if feature_sample:
        rows = FeatureRows(dataset, config.bucket_s, feature_sample, day_s=day_s)
        warm = Clock(start - timedelta(seconds=warm_s), rate)
        rows.warm(itertools.islice(simulate(dataset, seed=seed + 50, clock=warm), int(warm_s * rate)))
    clock = Clock(start, rate)
    stream = with_rows(simulate(dataset, seed=seed, clock=clock), rows)
    timed = Timed(Monitor(replace(config, seed=seed), embed, FEATURES if feature_sample else None))
    pinned_at = config.warmup_s + config.reference_s
    until = clock.now + timedelta(seconds=pinned_at + after_pin_s)
    pre_reports = []
    for batch in chunks(stream):
        pre_reports += timed.feed(batch)
        if clock.now >= until:
            break
    snapshot, t_drift = timed.monitor, clock.now
    delays = {kind: detect(snapshot, rows, kind, dataset, seed + 7, t_drift, rate, max_delay_s) for kind in ALL_KINDS}
    # No drift: the same monitor reads on.
    reports, sizes, next_mark = list(pre_reports), [], t_drift
    end = t_drift + timedelta(minutes=no_drift_min)
    for batch in chunks(stream):
        reports += timed.feed(batch)
        if clock.now >= next_mark:
            sizes.append({"stream_min": round((clock.now - t_drift).total_seconds() / 60, 1),
                          "state_bytes": state_bytes(timed.monitor)})
            next_mark += timedelta(minutes=max(no_drift_min / 3, 0.1))
        if clock.now >= end:
            break
    sizes.append({"stream_min": round((clock.now - t_drift).total_seconds() / 60, 1),
                  "state_bytes": state_bytes(timed.monitor)})
    evaluated = len(reports)
    alerting = sum(1 for r in reports if r.alerting)
    # Cost with decoding: what the stream worker does to each event before the monitor sees it.
    sample = list(itertools.islice(simulate(dataset, seed=seed + 99, clock=Clock(clock.now, rate)), decode_sample))
    raw = [encode(e) for e in sample]
    started = time.process_time()
    for payload in raw:
        decode(payload)
    decode_s = (time.process_time() - started) / len(raw)
    per_event_s = timed.cpu_s / timed.events
    return {
        "run": run, "seed": seed, "events": timed.events, "delays": delays,
        "no_drift": {"minutes": no_drift_min, "windows_evaluated": evaluated, "alerting_windows": alerting,
                     "alerts": [a.as_json() for r in reports for a in r.alerts],
                     "per_window_rate": alerting / evaluated if evaluated else None},
        "alpha_window": config.alpha_window, "alpha_test": snapshot.alpha_test, "tests": len(snapshot.tests),
        "cost": {"monitor_events_per_s": 1 / per_event_s, "with_decode_events_per_s": 1 / (per_event_s + decode_s)},
        "memory": sizes, "counts": dict(timed.monitor.counts),
    }


def load_embedder(name: str, data_dir: Path):
    if name == "hashed":
        from tailbridge.models.monitoring.embed import hashed_trigrams

        return hashed_trigrams
    from tailbridge.models.retrieval.export import MINILM_ONNX_DIR, OnnxMiniLMEncoder

    encoder = OnnxMiniLMEncoder(data_dir / "models" / MINILM_ONNX_DIR)
    return encoder.encode_queries


def summarise(runs: list[dict]) -> dict:
    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    delays = {}
    for kind in ALL_KINDS:
        values = [r["delays"][kind]["delay_s"] for r in runs]
        target = TARGET_DELAY_S.get(kind, DEFAULT_TARGET_S)
        med = median(values)
        delays[kind] = {"median_s": med, "max_s": max((v for v in values if v is not None), default=None),
                        "missed": sum(v is None for v in values), "target_s": target,
                        "pass": med is not None and all(v is not None and v <= target for v in values)}
    false_alarms = sum(len(r["no_drift"]["alerts"]) for r in runs)
    windows = sum(r["no_drift"]["windows_evaluated"] for r in runs)
    alerting = sum(r["no_drift"]["alerting_windows"] for r in runs)
    cost = median([r["cost"]["monitor_events_per_s"] for r in runs])
    first = [r["memory"][0]["state_bytes"] for r in runs]
    last = [r["memory"][-1]["state_bytes"] for r in runs]
    # Bounded: the state fills its caps (the searches remembered for attribution: 100,000, about
    # 20 min at 1,000 events/s), then stays: the last third of a long stream adds nothing.
    long = [r["memory"] for r in runs if len(r["memory"]) >= 4]
    return {"delays": delays, "false_alarms": false_alarms, "false_alarm_pass": false_alarms == 0,
            "per_window_rate": alerting / windows if windows else None, "windows_evaluated": windows,
            "alpha_window": runs[0]["alpha_window"],
            "monitor_events_per_s_median": cost,
            "with_decode_events_per_s_median": median([r["cost"]["with_decode_events_per_s"] for r in runs]),
            "cost_pass": cost is not None and cost >= TARGET_EVENTS_PER_S,
            "state_bytes_first_median": median(first), "state_bytes_last_median": median(last),
            "state_bytes_by_minute": long[0] if long else None,
            "memory_bounded": bool(long) and all(m[-1]["state_bytes"] <= 1.02 * m[-3]["state_bytes"] for m in long)}


def print_summary(summary: dict, runs: int) -> None:
    table = Table(title=f"drift detection delay, stream time ({runs} runs)")
    for column in ("drift", "median s", "max s", "missed", "target s", ""):
        table.add_column(column)
    for kind, d in summary["delays"].items():
        table.add_row(kind, fmt(d["median_s"], 0), fmt(d["max_s"], 0), str(d["missed"]), fmt(d["target_s"], 0),
                      "PASS" if d["pass"] else "MISS")
    console.print(table)
    console.print(f"no drift: {summary['false_alarms']} false alarms in {summary['windows_evaluated']} windows "
                  f"(per-window rate {fmt(summary['per_window_rate'], 5)}; calibrated {summary['alpha_window']:g})"
                  f" {'PASS' if summary['false_alarm_pass'] else 'MISS'}")
    console.print(f"cost: {fmt(summary['monitor_events_per_s_median'], 0)} events/s on one core in the monitor, "
                  f"{fmt(summary['with_decode_events_per_s_median'], 0)} with decoding "
                  f"(target {TARGET_EVENTS_PER_S:,}) {'PASS' if summary['cost_pass'] else 'MISS'}")
    marks = ", ".join(f"{m['state_bytes'] / 1e6:.2f} MB at {m['stream_min']:g} min"
                      for m in summary["state_bytes_by_minute"] or [])
    console.print(f"memory: monitor state {marks or '-'} of the no-drift stream "
                  f"({'bounded: flat over its last third' if summary['memory_bounded'] else 'GROWS or too short to tell'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="Events per second of stream time.")
    parser.add_argument("--no-drift-minutes", type=float, default=30.0)
    parser.add_argument("--no-drift-runs", type=int, default=None,
                        help="Runs that read the no-drift stream to its end (default: all; the others stop at T).")
    parser.add_argument("--max-delay", type=float, default=180.0, help="Longest wait for a drift's first alert (s).")
    parser.add_argument("--embedder", choices=("minilm", "hashed"), default="minilm")
    parser.add_argument("--feature-sample", type=int, default=64,
                        help="Users and items per bucket whose feature rows the monitor reads (0: none).")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="Where the MiniLM ONNX export lives.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    config, items, users, after_pin = MonitorConfig(), 5000, 200, 120.0
    if args.smoke:
        config = MonitorConfig(bucket_s=1.0, windows=(1, 3), warmup_s=5.0, reference_s=20.0, draws=200)
        items, users, after_pin = 300, 20, 6.0
        args.runs, args.rate, args.no_drift_minutes, args.max_delay, args.embedder = 1, 200.0, 1.0, 20.0, "hashed"
        args.no_drift_runs = None
    meta = run_meta(config=asdict(config), rate=args.rate, embedder=args.embedder, smoke=args.smoke,
                    feature_sample=args.feature_sample)
    dataset = synth.generate(items=items, users=users, seed=7)
    embed = load_embedder(args.embedder, args.data_dir.resolve())
    runs = []
    for run in range(args.runs):
        started = time.monotonic()
        minutes = args.no_drift_minutes if args.no_drift_runs is None or run < args.no_drift_runs else 0.0
        runs.append(one_run(run, dataset, config, embed, args.rate, minutes, after_pin, args.max_delay,
                            2_000 if args.smoke else 20_000, args.feature_sample, 120.0 if args.smoke else 300.0,
                            1.0 if args.smoke else 5.0))
        console.print(f"run {run}: {time.monotonic() - started:.0f} s, delays "
                      + ", ".join(f"{k} {fmt(v['delay_s'], 0)}" for k, v in runs[-1]["delays"].items())
                      + f", no-drift alerts {len(runs[-1]['no_drift']['alerts'])}")
    summary = summarise(runs)
    print_summary(summary, len(runs))
    write_json(args.json, {"meta": meta, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
