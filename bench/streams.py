"""Benchmark of the stream worker (`tailbridge worker`): throughput and freshness.

    .venv/bin/python -m tailbridge.bench.streams [--runs 3] [--json out.json] [--quick | --smoke] [--workers 2]
                                                 [--phases throughput,freshness,vectors,stages,consume]
                                                 [--stack-from-env]

It starts a private embedded stack through the CLI (`tailbridge stack up`: Tansu, redis-server,
the default Milvus engine on free loopback ports, in a temporary state dir) and stops it at the end;
with ``--stack-from-env`` it uses the stack the TAILBRIDGE_* settings point at instead (it
must be up). In every run it measures the phases of ``tailbridge.bench.stream_phases``, each
in a namespace of its own (a unique topic prefix and Feast project, so nothing is shared
between measurements):

1. throughput  - events/s W workers (--workers, default 2) apply from a backlog of simulated behaviour events;
2. freshness   - time from a probe click's send until Feast serves it, at 1,000 events/s;
3. vectors     - time from a catalog update's send until Milvus serves it, at 50 updates/s;
4. consume     - the same on a faust agent that only decodes: the ceiling below the worker;
5. stages      - the worker's processors in-process, stage by stage: which component is the wall;

and the peak (VmHWM) and current (VmRSS) memory and the CPU of the worker, broker, Milvus
server and redis-server from /proc. Everything it created (stack, keys, collections,
temp dir) is removed at the end. ``--smoke`` runs every phase once at tiny sizes (seconds
each): it checks that the benchmark works, its numbers are no measurement. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import traceback
import uuid
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tailbridge.bench.common import (BenchError, code_version, console, exit_on_sigterm, free_port, loadavg_text,
                                     memory_of, run_meta, stack_down, stack_pids, stack_status, stack_up, write_json)
from tailbridge.bench.stream_phases import consume, freshness, stages, throughput, vectors
from tailbridge.bench.stream_phases.namespace import Config, Setup
from tailbridge.bench.stream_phases.report import brief, diagnose, log_problems, print_results, print_targets, \
    summarise, verdicts
from tailbridge.settings import Settings
from tailbridge.synthetic import catalog as synth

PHASES = {"throughput": throughput.run, "freshness": freshness.run, "vectors": vectors.run,
          "stages": stages.run, "consume": consume.run}
# The code the measured processes run: a result says whether it differed from the commit.
CODE_PATHS = ("streams", "feature_repo", "infra", "tailbridge", "models/retrieval/encoders.py",
              "models/retrieval/export.py", "models/data/user_context.py")


def make_config(args) -> Config:
    mode = "smoke" if args.smoke else "quick" if args.quick else "default"
    sizes = {  # mode: (dataset items, throughput events, stream seconds, catalog items, stage batches)
        "default": (5000, 60_000, 20.0, 1000, 10),
        "quick": (5000, 10_000, 8.0, 300, 4),
        "smoke": (300, 2_000, 3.0, 40, 1),
    }[mode]
    items, events, seconds, catalog, batches = sizes
    smoke = mode == "smoke"
    return Config(
        runs=1 if smoke else args.runs, mode=mode, seed=args.seed,
        dataset_items=items, dataset_users=20 if smoke else 200,
        throughput_events=args.events or events, throughput_workers=args.workers,
        freshness_rate=300.0 if smoke else 1000.0, freshness_seconds=seconds,
        probe_rate=10.0, probe_users=10 if smoke else 40,
        vector_rate=20.0 if smoke else 50.0, vector_seconds=seconds,
        catalog_items=catalog, behaviour_batches=batches, index_batches=batches,
        poll_s=0.05, startup_timeout_s=240.0, stall_timeout_s=120.0,
    )


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m tailbridge.bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every phase (default 3)")
    parser.add_argument("--json", type=Path, help="write every number (per run and across runs) here")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="5,000 events, 8 s streams, smaller catalog")
    size.add_argument("--smoke", action="store_true",
                      help="one run at tiny sizes (seconds per phase): checks the benchmark works, measures nothing")
    parser.add_argument("--events", type=int, help="events for the throughput phase (default 60,000; quick 10,000)")
    parser.add_argument("--workers", type=int, default=2,
                        help="workers side by side in the throughput phase, sharing the partitions (default 2)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma separated subset of {','.join(PHASES)}")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--stack-from-env", action="store_true",
                        help="use the stack the TAILBRIDGE_* settings point at (it must be up) instead of "
                             "starting a private one")
    parser.add_argument("--redis-url", help="private stack: use this Redis instead of starting a redis-server")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Settings field for every namespace, for what-if runs "
                             "(e.g. --set worker_flush_seconds=3600); the default measures the defaults")
    args = parser.parse_args(argv)
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phase_list) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    args.overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or field not in Settings.model_fields:
            parser.error(f"--set wants FIELD=VALUE with a Settings field, got {item!r}")
        args.overrides[field] = value
    return args


def base_settings(args, workdir: Path) -> Settings:
    """The stack's settings: from the environment (--stack-from-env), or a private stack's in
    the temp dir, on free loopback ports."""
    if args.stack_from_env:
        return Settings(**args.overrides)
    rid = uuid.uuid4().hex[:6]
    return Settings(
        state_dir=workdir / "state", data_dir=workdir / "data",
        kafka_bootstrap=f"127.0.0.1:{free_port()}", milvus_uri=f"http://127.0.0.1:{free_port()}",
        # A port nothing answers on, so `stack up` starts a redis-server of our own (isolated, measurable).
        redis_url=args.redis_url or f"redis://127.0.0.1:{free_port()}/0", online_store="redis",
        feast_project=f"tbbench_{rid}", topic_prefix=f"tbbench-{rid}", **args.overrides,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    cfg = make_config(args)
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    base = base_settings(args, workdir)
    meta = run_meta(config=asdict(cfg), phases=args.phase_list, workdir=str(workdir),
                    settings_overrides=args.overrides, stack_from_env=args.stack_from_env,
                    worker_settings={k: v for k, v in base.model_dump().items() if k.startswith("worker_")},
                    code=code_version(CODE_PATHS))
    console.print(f"[bold]tailbridge stream benchmark[/]: {cfg.runs} run(s), phases {', '.join(args.phase_list)}"
                  f"{'' if cfg.mode == 'default' else f' ({cfg.mode})'}; {os.cpu_count()} CPUs, load average "
                  f"{loadavg_text()}; work dir {workdir}"
                  + (f"; [yellow]settings overridden: {args.overrides}[/]" if args.overrides else ""))
    runs: list[dict] = []
    errors: list[str] = []
    stack_memory: dict[str, dict | None] = {}
    with ExitStack() as cleanup:
        def remove_workdir() -> None:
            if args.keep:
                console.print(f"kept {workdir}")
            elif errors or log_problems(runs):  # keep the logs to read, not the data
                shutil.rmtree(workdir / "state" / "milvus", True)
                shutil.rmtree(workdir / "data", True)
                shutil.rmtree(workdir / "models", True)
                console.print(f"kept the logs in {workdir} (a phase failed or a worker logged retries)")
            else:
                shutil.rmtree(workdir, True)

        cleanup.callback(remove_workdir)
        if args.stack_from_env:
            statuses = stack_status(base)
            down = [s["name"] for s in statuses if not s["healthy"]]
            if down:
                console.print(f"[red]the stack the settings point at is not up:[/] {', '.join(down)} "
                              "(`tailbridge stack up`, or drop --stack-from-env for a private stack)")
                return 1
        else:
            cleanup.callback(stack_down, base)
            try:
                with console.status("starting a private embedded stack (`tailbridge stack up`)"):
                    statuses = stack_up(base)
            except BenchError as exc:
                errors.append(str(exc))
                console.print(f"[red]{exc}[/]")
                return 1
        for s in statuses:
            console.print(f"  {s['name']:6} {s['mode']:9} {s['address']} {s['detail']}")
        pids = stack_pids(statuses)
        meta["stack"] = statuses
        with console.status("generating the demo dataset"):
            dataset = synth.generate(items=cfg.dataset_items, users=cfg.dataset_users, seed=cfg.seed)
        setup = Setup(cfg, base, workdir, dataset, pids)
        for run in range(cfg.runs):
            runs.append(run_phases(setup, args.phase_list, run, errors))
        stack_memory = {n: memory_of(p) for n, p in pids.items()}
        stack_memory["bench process (in-process stages)"] = memory_of(os.getpid(), tree=False)

    summary = summarise(runs)
    verdict = verdicts(summary)
    meta["loadavg_end"] = os.getloadavg()
    meta["finished"] = datetime.now(UTC).isoformat()
    print_results(cfg.mode, runs, summary, verdict, stack_memory)
    diagnosis = diagnose(runs, summary, verdict, os.cpu_count() or 1)
    print_targets(diagnosis, runs)
    if errors:
        console.print(f"[red]{len(errors)} phase(s) failed[/]: " + "; ".join(e.splitlines()[0] for e in errors))
    console.print(f"[dim]The machine is shared: numbers are noisy (load average {loadavg_text(meta['loadavg_start'])} "
                  f"at start, {loadavg_text(meta['loadavg_end'])} at end).[/]")
    write_json(args.json, {"meta": meta, "targets": verdict, "diagnosis": diagnosis, "summary": summary, "runs": runs,
                           "stack_memory": stack_memory, "errors": errors})
    return 1 if errors else 0


def run_phases(setup: Setup, phases: list[str], run: int, errors: list[str]) -> dict:
    """One run: every phase in turn; a phase that fails is recorded and the next one goes on."""
    result: dict[str, Any] = {"run": run + 1}
    for phase in phases:
        console.rule(f"run {run + 1}/{setup.cfg.runs}: {phase}")
        started = time.monotonic()
        try:
            result[phase] = PHASES[phase](setup, run)
        except BenchError as exc:
            result[phase] = {"error": str(exc)}
            errors.append(f"run {run + 1} {phase}: {exc}")
            console.print(f"[red]{phase} failed:[/] {exc}")
        except Exception as exc:  # noqa: BLE001  record, go on to the next phase
            result[phase] = {"error": traceback.format_exc()}
            errors.append(f"run {run + 1} {phase}: {exc!r}")
            console.print(f"[red]{phase} failed:[/]\n{traceback.format_exc()}")
        result[phase]["phase_s"] = time.monotonic() - started
        result[phase]["stack_memory"] = {n: memory_of(p) for n, p in setup.stack_pids.items()}
        console.print(f"  {phase} done in {result[phase]['phase_s']:.0f} s: " + brief(phase, result[phase]))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
