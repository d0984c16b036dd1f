"""One loop iteration after shopper tastes drift: held-out purchase nDCG@10, frozen vs re-aligned.

    .venv/bin/python -m tailbridge.bench.loop [--items 5000] [--users 200] [--sessions 20000]
                                              [--drift-at 0.5] [--frozen-minutes 6] [--loop-minutes 4]
                                              [--out DIR] [--json out.json] [--smoke]

1. Demo data (``tailbridge data synth``) and a simulated feedback log of ``--sessions`` shopper
   sessions (``synthetic.feedback``): the first ``--drift-at`` of them with the dataset's
   shoppers, the rest, later in time, with their tastes shifted (``synthetic.drift``'s
   ``taste``: every persona's department interests move to the next department), as
   ``tailbridge data replay --drift taste@T`` publishes them.
2. The frozen ranker: trained on the log before the drift only (``--frozen-minutes``), serving
   in the registry (the artifact under ``--out`` is reused by the next run with the same sizes).
3. One iteration of the loop's ranker step (``cli.loop``: the cutoff, the held-out slice and
   ``ranker_step`` as ``tailbridge loop --once --force --kinds ranker`` runs them): a
   candidate retrained from the frozen version on the log up to the cutoff (the drift's
   sessions included), gated against it on the latest ``TAILBRIDGE_LOOP_HOLDOUT_FRACTION`` of
   searches, all after the drift.
4. On those held-out pages, both rankers and the simulator's logged order: purchase / cart /
   click nDCG@10 on the logged labels (the gate's numbers), and on the simulator's ground truth
   (``synthetic.shoppers.GroundTruth`` of the drifted shoppers): the expected purchase
   nDCG@10 and expected purchases per page were the page served in each order
   (``models.ranking.evaluation.truth_metrics``).

No Kafka, Redis or Milvus: the log is the one the stream worker would have written
(``synthetic.feedback``), and the ranker step needs none of them. The retriever and rewriter
steps are not run here (the retriever's replay re-ranks the same logged pages).

    .venv/bin/python -m tailbridge.bench.loop --serving http://127.0.0.1:8000 --data DIR [--rate 5]
                                              [--idle 60] [--json out.json]

The second question: does an iteration block serving? Against a running ``tailbridge serve``
(with the app's environment; ``bench.serving --prepare`` builds the setup), open-loop searches
at ``--rate`` per second (``bench.serving``'s client: latency from the scheduled send time)
for ``--idle`` seconds, then the same while ``tailbridge loop --once --force --data DIR`` runs
as a child process, until it exits. It reports end-to-end p50 / p95 / p99 and errors of both
phases, the iteration's wall time and each line the loop printed with the second it printed it
(the step boundaries: the behaviour refresh, each kind's training, gate and promotion).
"""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path

from tailbridge.bench.common import console, run_meta, simulation_parser, write_json


def drifted_log(data: Path, sessions: int, drift_at: float, seed: int):
    """The simulated log: ``drift_at`` of the sessions as the shoppers are, then the rest with
    shifted tastes (another seed), starting a second after the last event before."""
    import pandas as pd

    from tailbridge.synthetic.drift import shifted_tastes
    from tailbridge.synthetic.feedback import simulate_feedback

    before = simulate_feedback(data, sessions=int(sessions * drift_at), seed=seed)
    after = simulate_feedback(data, sessions=sessions - int(sessions * drift_at), seed=seed + 1,
                              start=before["event_time"].max().to_pydatetime() + timedelta(seconds=1),
                              shoppers=shifted_tastes)
    return pd.concat([before, after], ignore_index=True), before["event_time"].max()


def main(argv: list[str] | None = None) -> dict:
    parser = simulation_parser(__doc__, items=5000, users=200, sessions=20000, out="data/bench-loop")
    parser.add_argument("--drift-at", type=float, default=0.5, help="share of the sessions before the drift")
    parser.add_argument("--frozen-minutes", type=float, default=6.0, help="training budget of the frozen ranker")
    parser.add_argument("--frozen-epochs", type=int, default=None,
                        help="train the frozen ranker this many epochs instead, no budget and no stage 2 (a control: "
                             "the loop's candidate trains within its budget)")
    parser.add_argument("--loop-minutes", type=float, default=4.0,
                        help="the loop's ranker budget (TAILBRIDGE_LOOP_RANKER_MINUTES)")
    parser.add_argument("--serving", default=None, help="the running app: measure search latency during an iteration")
    parser.add_argument("--data", type=Path, default=None, help="--serving: the demo data dir the app and loop use")
    parser.add_argument("--rate", type=float, default=5.0, help="--serving: searches per second")
    parser.add_argument("--idle", type=float, default=60.0, help="--serving: seconds measured before the iteration")
    args = parser.parse_args(argv)
    if args.serving:
        return during_iteration(args)
    if args.smoke:
        args.items, args.users, args.sessions, args.frozen_minutes, args.loop_minutes = 150, 6, 160, 0.1, 0.1

    import numpy as np
    import torch

    from tailbridge.cli.loop import ranker_step
    from tailbridge.models import alignment
    from tailbridge.models.data.feedback import write_feedback
    from tailbridge.models.ranking import model as rk
    from tailbridge.models.ranking.evaluation import true_gains, truth_metrics
    from tailbridge.models.ranking.training import RankerTrainConfig, train
    from tailbridge.models.registry import Registry, entry_from_artifact, models_root
    from tailbridge.settings import Settings
    from tailbridge.synthetic import catalog as synth
    from tailbridge.synthetic.drift import shifted_tastes
    from tailbridge.synthetic.shoppers import GroundTruth

    torch.set_num_threads(args.threads)
    say = lambda line: console.print(f"  {line}", soft_wrap=True)  # noqa: E731
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        started = time.monotonic()
        out = fn()
        timings[name] = round(time.monotonic() - started, 1)
        console.print(f"{name}: {timings[name]} s")
        return out

    root = args.out / f"{args.items}-{args.users}-{args.sessions}-{args.drift_at}-{args.seed}"
    data, log, before_log = root / "demo", root / "feedback", root / "feedback-before-drift"
    if not (data / "corpus.jsonl").is_file():
        timed("synth", lambda: synth.write(synth.generate(items=args.items, users=args.users, seed=args.seed), data))
    if not (log / "examples").is_dir():
        def simulate():
            frame, drift_time = drifted_log(data, args.sessions, args.drift_at, args.seed)
            write_feedback(frame[frame["event_time"] <= drift_time], before_log)
            write_feedback(frame, log)
        timed("simulate", simulate)
    settings = Settings(data_dir=root, feast_project="bench_loop", loop_ranker_minutes=args.loop_minutes,
                        **({"loop_gate_min_pages": 0} if args.smoke else {}))
    registry = Registry(models_root(root))
    frozen = models_root(root) / "ranker" / ("rk-frozen" + (f"-e{args.frozen_epochs}" if args.frozen_epochs else ""))
    budget = {"max_minutes": args.frozen_minutes} if args.frozen_epochs is None else \
        {"max_minutes": None, "epochs": args.frozen_epochs, "finetune_steps": 0}
    if not (frozen / rk.CONFIG_FILE).is_file():
        timed("train frozen", lambda: train(
            data, before_log, frozen.parent, frozen.name, cfg=RankerTrainConfig(
                **budget, comparisons=(), export_onnx=False, test_fraction=0.1),
            baseline=False, say=say))
    # Each run measures from the frozen version: the earlier runs' candidates are forgotten.
    for path in (models_root(root) / "ranker").iterdir():
        if not path.name.startswith("rk-frozen"):
            shutil.rmtree(path)
    (models_root(root) / "registry.json").unlink(missing_ok=True)
    registry.register(entry_from_artifact("ranker", frozen))
    registry.promote("ranker", frozen.name)

    cut_time, cut_search, searches = alignment.log_cutoff(log, settings.loop_holdout_fraction)
    cutoff = (cut_time, cut_search)
    rd, held = timed("held-out slice",
                     lambda: alignment.heldout_slice(data, log, cutoff, settings.loop_gate_max_pages, say))
    report_step = timed("ranker step", lambda: ranker_step(settings, data, log, cutoff, (rd, held), say))
    candidate = rk.load_ranker(models_root(root) / "ranker" / report_step.candidate)

    truth = GroundTruth(shifted_tastes(synth.load(data)))
    gains = true_gains(rd, held, truth)
    orders = {"frozen": alignment.ranker_scores(rk.load_ranker(frozen), rd, held),
              "re-aligned": alignment.ranker_scores(candidate, rd, held),
              "logged order": -rd.position.astype(float)}
    systems = {name: {"logged": alignment.ranker_replay(None, rd, held, scores),
                      "truth": truth_metrics(rd, scores, held, gains, truth)} for name, scores in orders.items()}
    result = {
        "meta": run_meta(), "args": {k: str(v) for k, v in vars(args).items()},
        "log": {"searches": searches, "before_drift_until": read_time(before_log).isoformat(),
                "cutoff": cut_time.isoformat(),
                "held_out_searches": len(held)},
        "step": {"candidate": report_step.candidate, "parent": report_step.parent, "promoted": report_step.promoted,
                 "minutes": round(report_step.minutes, 2), "gate_reason": report_step.gate["reason"]},
        "systems": systems, "seconds": timings,
    }
    console.print(f"log: {searches} searches; held out: {len(held)} after {cut_time.isoformat()} (all after the drift)")
    for name, s in systems.items():
        t = s["truth"]
        console.print(f"{name:>12}: logged purchase nDCG@10 {s['logged']['purchase_ndcg@10']:.4f} "
                      f"cart {s['logged']['cart_ndcg@10']:.4f} click {s['logged']['click_ndcg@10']:.4f}; "
                      f"expected purchase nDCG@10 {t['ndcg@10_purchase_expected']:.4f}, "
                      f"expected purchases/page {t['expected_purchases_per_page']:.4f} ({t['pages']} pages)")
    console.print(f"ranker step: {report_step.candidate} from {report_step.parent} in {report_step.minutes:.1f} min; "
                  f"{'promoted' if report_step.promoted else 'rejected'} ({report_step.gate['reason']})")
    if args.json:
        write_json(args.json, result)
    return result


def during_iteration(args) -> dict:
    """Search latency while ``tailbridge loop --once --force`` runs, against the same while idle."""
    import asyncio
    import os
    import subprocess
    import threading

    import httpx

    from tailbridge.bench.common import CLI, latency_summary
    from tailbridge.bench.serving import handler_phase, load_queries, make_plan

    users = httpx.get(f"{args.serving}/users", params={"limit": 200}, timeout=120).json()["user_ids"]
    chunk = max(1, int(args.rate * 10))  # 10 s of searches per open-loop burst

    def phase(plan, until) -> list[dict]:
        records, offset = [], 0
        while not until(offset):
            records += asyncio.run(handler_phase(args.serving, plan, offset, args.rate, chunk, 10, 30.0))
            offset += chunk
        return records

    def summary(records: list[dict]) -> dict:
        ok = [r["e2e_ms"] for r in records if r["status"] == 200]
        return latency_summary(ok) | {"errors": len(records) - len(ok),
                                      "degraded": sum(1 for r in records if r.get("degraded"))}

    plan = make_plan(load_queries(args.data), {"head": 0.4, "torso": 0.2, "tail": 0.4}, users, 100_000, args.seed)
    console.print(f"idle: {args.idle:g} s at {args.rate:g} searches/s")
    idle = phase(plan, lambda sent: sent >= args.idle * args.rate)
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    loop = subprocess.Popen([CLI, "loop", "--once", "--force", "--data", str(args.data)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"COLUMNS": "200"})

    def read() -> None:
        for line in loop.stdout:
            lines.append((round(time.monotonic() - started, 1), line.rstrip()))
            console.print(f"  [{lines[-1][0]:7.1f} s] {lines[-1][1]}", soft_wrap=True, highlight=False)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    during = phase(plan, lambda sent: loop.poll() is not None)
    loop.wait()
    reader.join(10)
    wall = time.monotonic() - started
    result = {"meta": run_meta(url=args.serving, rate=args.rate, users=len(users)),
              "idle": summary(idle), "during": summary(during), "loop": {"exit": loop.returncode,
                                                                       "wall_s": round(wall, 1), "lines": lines}}
    for name in ("idle", "during"):
        s = result[name]
        console.print(f"{name:>7}: {s['count']} searches, p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
                      f"p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms; {s['errors']} errors, "
                      f"{s['degraded']} degraded")
    console.print(f"iteration: exit {loop.returncode}, {wall / 60:.1f} min wall")
    if args.json:
        write_json(args.json, result)
    return result


def read_time(log: Path):
    from tailbridge.models.data.feedback import read_feedback

    return read_feedback(log)["event_time"].max()


if __name__ == "__main__":
    main()
