"""The `tailbridge` command: wires settings to the stack, topics, features and data."""

from __future__ import annotations

import signal
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tailbridge.cli import loop as loop_cli
from tailbridge.cli import models as models_cli
from tailbridge.cli.monitor import monitor_app
from tailbridge.settings import Settings, get_settings

# Library deprecation notices (kafka-python, Feast) are for their maintainers, not our users.
warnings.filterwarnings("ignore", category=DeprecationWarning)

app = typer.Typer(help="tailbridge: real-time features and retrieval for e-commerce search.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Kafka (Tansu), Redis, Milvus (the 2.3.5 server, or Milvus Lite).",
                        no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics of the event contracts.", no_args_is_help=True)
features_app = typer.Typer(help="Feast feature repository.", no_args_is_help=True)
data_app = typer.Typer(help="Demo data: generate a catalog and queries, replay behaviour.", no_args_is_help=True)
train_app = typer.Typer(help="Train models (models/).", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models offline against baselines.", no_args_is_help=True)
worker_app = typer.Typer(invoke_without_command=True)  # help: the callback's (`worker` below)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(features_app, name="features")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(worker_app, name="worker")
app.add_typer(monitor_app, name="monitor")
app.add_typer(models_cli.app, name="models")
app.command("loop")(loop_cli.loop_command)

console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(1)


def _fail_kafka(settings: Settings, exc: Exception) -> None:
    _fail(f"Kafka at {settings.kafka_bootstrap}: {exc} (is the stack up? `tailbridge stack up`)")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _default_data_dir() -> Path:
    return get_settings().data_dir / "demo"


# ------------------------------------------------------------------ stack


def _status_table(statuses, title: str) -> Table:
    table = Table(title=title)
    for column in ("component", "address", "mode", "healthy", "pid", "detail"):
        table.add_column(column)
    for s in statuses:
        table.add_row(s.name, s.address, s.mode, "yes" if s.healthy else "[red]no[/]", str(s.pid or ""), s.detail)
    return table


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _print_statuses(statuses, title: str, as_json: bool) -> None:
    if as_json:
        typer.echo(orjson.dumps([asdict(s) for s in statuses]).decode())
    else:
        console.print(_status_table(statuses, title))


@stack_app.command("up")
def stack_up(as_json: JsonOption = False) -> None:
    """Start the embedded components that are not already answering (idempotent)."""
    from tailbridge.infra import stack

    settings = get_settings()
    try:
        with console.status("starting the stack..."):
            statuses = stack.up(settings)
    except stack.StackError as exc:
        _fail(str(exc))
    _print_statuses(statuses, "stack up", as_json)
    if not as_json:
        console.print(f"logs and pid files: {settings.state_dir}")


@stack_app.command("down")
def stack_down() -> None:
    """Stop only what `stack up` started (idempotent)."""
    from tailbridge.infra import stack

    stopped = stack.down(get_settings())
    console.print("\n".join(f"stopped {s.name} (pid {s.pid})" for s in stopped) or "nothing to stop")


@stack_app.command("status")
def stack_status(as_json: JsonOption = False) -> None:
    """Each component, its address and whether it is embedded or external. Exit 1 if one is down."""
    from tailbridge.infra import stack

    statuses = stack.status(get_settings())
    _print_statuses(statuses, "stack status", as_json)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


# ------------------------------------------------------------------ topics and features


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic and its dead-letter topic (idempotent)."""
    from kafka.errors import KafkaError

    from tailbridge.streams.topics import create_topics

    settings = get_settings()
    try:
        result = create_topics(settings)
    except KafkaError as exc:
        _fail_kafka(settings, exc)
    for name, state in result.items():
        console.print(f"{state:8} {name}")


@topics_app.command("list")
def topics_list() -> None:
    """The topic registry: name, key and what each topic carries."""
    from tailbridge.streams.topics import TOPICS

    settings = get_settings()
    table = Table(title="topics")
    for column in ("topic", "key", "events", "dead letters", "carries"):
        table.add_column(column)
    for spec in TOPICS.values():
        events = ", ".join(t.model_fields["type"].default for t in spec.events)
        table.add_row(spec.topic(settings), spec.key, events, spec.dlq(settings), spec.description)
    console.print(table)


@features_app.command("apply")
def features_apply() -> None:
    """Register the Feast entities and feature views and create the online tables."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tailbridge.feature_repo.store import apply, feature_store
    from tailbridge.feature_repo.online import resolve_online_store

    settings = get_settings()
    online = resolve_online_store(settings)
    where = online.redis_url if online.kind == "redis" else "SQLite"
    try:
        with console.status("feast apply..."):
            views = apply(feature_store(settings, online))
    except RedisConnectionError as exc:
        _fail(f"Redis at {where} does not answer ({exc}); `tailbridge stack up` starts or replaces it")
    console.print(f"applied {', '.join(views)} to project '{settings.feast_project}' (online store: {where})")


# ------------------------------------------------------------------ data


@data_app.command("synth")
def data_synth(
    items: Annotated[int, typer.Option(min=10, help="Catalog size.")] = 5000,
    users: Annotated[int, typer.Option(min=1, help="Number of shopper personas.")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 7,
    out: Annotated[Optional[Path], typer.Option(help="Output dir [default: DATA_DIR/demo].")] = None,
    style: Annotated[str, typer.Option(help="demo (taxonomy, descriptions, personas) or realistic (title-only "
                                            "home-improvement catalog, noisy queries and grades, no personas).")] = "demo",
) -> None:
    """Generate a catalog, queries with a vocabulary gap, graded labels and personas (BEIR format)."""
    from tailbridge.synthetic import catalog as synth
    from tailbridge.synthetic import realistic

    if style not in ("demo", "realistic"):
        _fail(f"unknown --style {style!r} (demo or realistic)")
    out = out or _default_data_dir()
    with console.status(f"generating {items} items ({style})..."):
        dataset = realistic.generate(items=items, seed=seed) if style == "realistic" else \
            synth.generate(items=items, users=users, seed=seed)
        files = synth.write(dataset, out)
    console.print(f"wrote {len(dataset.items)} items, {len(dataset.queries)} queries, {len(dataset.users)} users to {out}")
    for name, path in files.items():
        console.print(f"  {name}: {path}")


def _load_demo_data(data: Path):
    from tailbridge.synthetic import catalog as synth

    if not (data / "manifest.json").exists():
        _fail(f"no demo data in {data}: run `tailbridge data synth` first")
    return synth.load(data)


def print_published(reports) -> None:
    table = Table(title="published")
    for column in ("topic", "acknowledged", "failed"):
        table.add_column(column)
    for report in reports:
        for topic in sorted(report.acked.keys() | report.failed.keys()):
            table.add_row(topic, str(report.acked[topic]), str(report.failed[topic]))
    console.print(table)
    errors = [error for report in reports for error in report.errors]
    if errors:
        _fail("some events were not delivered:\n" + "\n".join(errors))


def _replay(data: Path, rate: float, events: int, seed: int, catalog: bool, drift: Optional[str] = None) -> None:
    from tailbridge.synthetic.replay import replay_dataset

    spec = None
    if drift:  # its module loads the monitor's Feast views (seconds of CPU): only when asked for
        from tailbridge.synthetic.drift import DriftSpec

        try:
            spec = DriftSpec.parse(drift)
        except ValueError as exc:
            _fail(str(exc))
    from kafka.errors import KafkaError

    dataset = _load_demo_data(data)
    settings = get_settings()
    try:
        with _progress() as progress:
            catalog_task = progress.add_task("catalog upserts", total=len(dataset.items), visible=catalog)
            task = progress.add_task(f"behaviour events @ {rate:g}/s" if rate else "behaviour events", total=events)
            reports = replay_dataset(settings, dataset, rate, events, seed, catalog,
                                     on_catalog=lambda e: progress.advance(catalog_task),
                                     on_behaviour=lambda e: progress.advance(task), drift=spec)
    except KafkaError as exc:
        _fail_kafka(settings, exc)
    print_published(reports)


@data_app.command("replay")
def data_replay(
    rate: Annotated[float, typer.Option(min=0, help="Behaviour events per second (0: as fast as possible).")] = 1000,
    events: Annotated[int, typer.Option(min=1, help="How many query and interaction events to publish.")] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of the simulated sessions.")] = 7,
    catalog: Annotated[bool, typer.Option(help="First publish every catalog item as an upsert.")] = True,
    data: Annotated[Optional[Path], typer.Option(help="Demo data dir [default: DATA_DIR/demo].")] = None,
    drift: Annotated[Optional[str], typer.Option(
        help="Inject drift KIND@T, T seconds (or 90s, 5m) into the stream: taste, vocab (new category), missing / "
             "constant (a broken field), model (a model swap).")] = None,
) -> None:
    """Publish simulated shopper sessions (queries, impressions, clicks, carts, purchases) to Kafka."""
    _replay(data or _default_data_dir(), rate, events, seed, catalog, drift)


# ------------------------------------------------------------------ stream processing


@worker_app.callback()
def worker(ctx: typer.Context, loglevel: Annotated[str, typer.Option(help="faust log level.")] = "warning") -> None:
    """Run the stream processors (user context, item stats, item indexer, feedback log).
    Start several side by side to share the partitions; Ctrl-C or SIGTERM stops one within
    seconds, even while it retries. `tailbridge worker status` shows how each is doing."""
    if ctx.invoked_subcommand is not None:
        return
    from tailbridge.cli.faust_worker import run_and_exit
    from tailbridge.streams.app import create_app

    try:
        app_ = create_app(get_settings())
    except KeyboardInterrupt:  # before the worker's own signal handling is in place
        raise typer.Exit(130) from None
    run_and_exit(app_, loglevel)


@worker_app.command("status")
def worker_status(as_json: JsonOption = False) -> None:
    """Each running worker's processors and jobs: last progress, events held and waiting, the
    oldest unapplied event, retries, dead letters; then what is stuck or lagging, and why.
    Exit 1 if no worker runs, or one is stuck or lagging."""
    import time

    import redis

    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.streams import heartbeat

    settings = get_settings()
    online = resolve_online_store(settings)
    if online.kind != "redis":
        _fail("the online store is SQLite: no worker runs without Redis")
    try:
        records = heartbeat.read_workers(redis.Redis.from_url(online.redis_url, socket_timeout=2,
                                                              socket_connect_timeout=2), settings)
    except redis.RedisError as exc:
        _fail(f"Redis at {online.redis_url} failed: {type(exc).__name__}: {exc}")
    now = time.time()
    problems = {r.worker: heartbeat.problems(r, settings, now) for r in records}
    if as_json:
        typer.echo(orjson.dumps([asdict(r) | {"problems": problems[r.worker]} for r in records]).decode())
    elif not records:
        console.print("no worker running")
    else:
        for record in records:
            console.print(_worker_table(record, problems[record.worker], now))
            for name, issue in problems[record.worker].items():
                console.print(f"[red]{name} {issue}[/]", soft_wrap=True)
    if not records or any(problems.values()):
        raise typer.Exit(1)


def _worker_table(record, problems: dict[str, str], now: float) -> Table:
    ago = lambda t: "" if t is None else f"{now - t:.0f} s"  # noqa: E731
    table = Table(title=f"worker {record.worker} (up {ago(record.started)})")
    table.add_column("processor / job", no_wrap=True)
    for column in ("state", "last progress", "held", "waiting", "oldest unapplied", "retrying for", "dead-lettered"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for name, p in sorted(record.processors.items()):
        state = f"[red]{problems[name].split(':')[0]}[/]" if name in problems else "ok"
        table.add_row(name, state, ago(p["last_progress"]) + " ago", str(p["held"]),
                      "" if p["waiting"] is None else str(p["waiting"]), ago(p["oldest_unapplied"]),
                      ago(p["retrying_since"]), str(p["dead_lettered"]))
    return table


@app.command()
def reindex(
    model: Annotated[str, typer.Option(help="Encoder version to build and switch serving to.")],
    keep_old: Annotated[bool, typer.Option(help="Keep the previous collection instead of dropping it.")] = False,
) -> None:
    """Re-encode the catalog with another encoder version beside the serving one, then switch
    serving over (alias move, no gap). Running workers index new catalog events into both."""
    from tailbridge.models.retrieval.encoders import load_encoder
    from tailbridge.streams.indexer import reindex as build
    from tailbridge.streams.item_index import connect

    settings = get_settings()
    try:
        encoder = load_encoder(model)
    except ValueError as exc:
        _fail(str(exc))
    with _progress() as progress:
        task = progress.add_task(f"re-encoding with {model}", total=None)
        result = build(settings, model, connect(settings), encoder,
                       progress=lambda done, total: progress.update(task, completed=done, total=total),
                       keep_old=keep_old)
    console.print(f"serving {result['to']} ({result['items']} items re-encoded)"
                  + (f"; dropped {result['from']}" if result["dropped_old"] else ""))


# ------------------------------------------------------------------ query handler


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Listen address (default TAILBRIDGE_SERVE_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default TAILBRIDGE_SERVE_PORT).")] = None,
    loglevel: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Run the query handler: POST /search, POST /events, /healthz, /readyz, /metrics and the
    search page at /."""
    import torch
    import uvicorn

    from tailbridge.serving.app import create_app
    from tailbridge.serving.dependencies import build_components

    settings = get_settings()
    torch.set_num_threads(1)  # one request per core beats two threads fighting over each request
    host, port = host or settings.serve_host, port or settings.serve_port
    try:
        built = build_components(settings)
    except (ValueError, FileNotFoundError) as exc:  # an unknown ranker version, bad weights...
        _fail(str(exc))
    console.print(f"tailbridge query handler on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(create_app(settings, built), host=host, port=port, log_level=loglevel)


# ------------------------------------------------------------------ retriever (bodies in cli/training.py)


@train_app.command("retriever")
def train_retriever(
    data: Annotated[Path, typer.Option(help="Dataset dir: BEIR (and demo), ESCI parquet or WANDS.")],
    out: Annotated[Optional[Path], typer.Option(help="Artifact root (default: DATA_DIR/models/retriever).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Version name (default: <data>-<settings hash>).")] = None,
    feedback: Annotated[Optional[Path], typer.Option(help="Feedback log dir (default: DATA/feedback if present).")] = None,
    simulate_feedback: Annotated[int, typer.Option(min=0, help="Demo data: simulate N sessions as the log first.")] = 0,
    dim: Annotated[int, typer.Option(min=12, help="Vector dimension of both towers.")] = 384,
    stage1_epochs: Annotated[Optional[int], typer.Option(min=0)] = None,
    stage2_epochs: Annotated[Optional[int], typer.Option(min=0)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2)] = None,
    max_train_queries: Annotated[Optional[int], typer.Option(min=1)] = None,
    max_minutes: Annotated[Optional[float], typer.Option(min=1, help="Time budget (default 28); stages end early.")] = None,
    restart: Annotated[bool, typer.Option(help="Discard a checkpoint instead of resuming it.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: all cores).")] = None,
) -> None:
    """Train the unified retriever (resumable: run the same command again after an interruption)."""
    from tailbridge.cli.training import CommandError, train_retriever as run

    overrides = {"stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs, "batch_size": batch_size,
                 "max_train_queries": max_train_queries, "max_minutes": max_minutes}
    try:
        run(data, out or get_settings().data_dir / "models" / "retriever", version, feedback, simulate_feedback,
            restart, threads, overrides, dim)
    except CommandError as exc:
        _fail(str(exc))


@eval_app.command("retriever")
def eval_retriever(
    data: Annotated[Path, typer.Option(help="Dataset dir (as for training).")],
    split: Annotated[str, typer.Option(help="Judgements to evaluate on.")] = "test",
    model: Annotated[Optional[str], typer.Option(help="Trained version name or artifact path.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where eval-<split>.json/.png go (default: the model dir).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Also write each system's top 100 as TREC runs.")] = None,
    feedback: Annotated[Optional[Path], typer.Option(help="Feedback log for user contexts (default: DATA/feedback).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,
    rewrites: Annotated[Optional[str], typer.Option(help="Rewriter version: also TREC runs of the handler's fused "
                                                         "search without and with its rewrite routes.")] = None,
) -> None:
    """BM25, MiniLM, hybrid RRF and the trained retriever (with and without user context)."""
    from tailbridge.cli.training import CommandError, eval_retriever as run
    from tailbridge.models.retrieval.encoders import retriever_dir

    default_out = retriever_dir(model) if model else get_settings().data_dir / "eval" / data.name
    try:
        run(data, split, model, out or default_out, run_dir, feedback, threads)
    except CommandError as exc:
        _fail(str(exc))
    if rewrites:
        from tailbridge.cli.rewriting import rewrite_runs

        rewrite_runs(data, split, rewrites, run_dir or (out or default_out) / "runs")


# ------------------------------------------------------------------ ranker (bodies in cli/training.py)


@train_app.command("ranker")
def train_ranker(
    data: Annotated[Path, typer.Option(help="Dataset dir with the catalog (as for the retriever).")],
    feedback: Annotated[Optional[Path], typer.Option(
        help="Feedback log dir (default: DATA/feedback, else the stream worker's DATA_DIR/offline/feedback).")] = None,
    simulate_feedback: Annotated[int, typer.Option(min=0, help="Demo data: simulate N sessions as the log first.")] = 0,
    version: Annotated[Optional[str], typer.Option(help="Version name (default: <data>-<settings hash>).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Artifact root (default: DATA_DIR/models/ranker).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=0, help="Stage-1 epochs (text encoder frozen).")] = None,
    finetune_steps: Annotated[Optional[int], typer.Option(min=0, help="Stage-2 steps (encoder fine-tuned).")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(min=0.5, help="Time budget for all the models (default 14).")] = None,
    baseline: Annotated[bool, typer.Option(
        help="Also train the comparison models (shared-bottom, click-only, no position model).")] = True,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: all cores).")] = None,
) -> None:
    """Train the multi-task ranker (click, add-to-cart, purchase funnel) and its comparison models."""
    from tailbridge.cli.training import CommandError, train_ranker as run

    overrides = {"epochs": epochs, "finetune_steps": finetune_steps, "max_minutes": max_minutes}
    try:
        run(data, out or get_settings().data_dir / "models" / "ranker", version, feedback, simulate_feedback,
            baseline, threads, overrides)
    except CommandError as exc:
        _fail(str(exc))


@eval_app.command("ranker")
def eval_ranker(
    data: Annotated[Path, typer.Option(help="Dataset dir with the catalog (as for training).")],
    model: Annotated[Optional[str], typer.Option(help="Trained version or artifact path (default: the newest).")] = None,
    feedback: Annotated[Optional[Path], typer.Option(help="Feedback log (default: the one the model was trained on).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,
    judged_queries: Annotated[int, typer.Option(min=0, help="Judged test queries re-ranked (0: skip).")] = 150,
) -> None:
    """On the searches after the training period: AUC per head and nDCG@10 of the served pages
    re-ranked; on judged test queries: nDCG@10 of MiniLM's top 50 re-ranked alone and blended;
    multi-task vs shared-bottom, click-only, no position model, logged order; score() latency."""
    from tailbridge.cli.training import CommandError, eval_ranker as run

    try:
        run(data, model, feedback, threads, judged_queries)
    except CommandError as exc:
        _fail(str(exc))


# ------------------------------------------------------------------ demo


@app.command("demo")
def run_demo(  # not `demo`: that name is the module tailbridge.cli.demo, which this imports
    items: Annotated[int, typer.Option(min=10)] = 5000,
    users: Annotated[int, typer.Option(min=1)] = 200,
    events: Annotated[int, typer.Option(min=1)] = 5000,
    rate: Annotated[float, typer.Option(min=0)] = 500,
    seed: int = 7,
    serve: Annotated[bool, typer.Option(help="End by serving search until Ctrl-C (--no-serve: stop after the "
                                              "example searches).")] = True,
    loop: Annotated[bool, typer.Option("--loop", help="After the ranker, run one alignment-loop iteration on the "
                                                      "replay's feedback log and print what it trained, the gate's "
                                                      "comparison and what it promoted.")] = False,
) -> None:
    """The main job on the embedded stack: stack up, data, topics, features, a worker processing
    a live replay while features and vectors change on screen, a ranker trained on the feedback
    it logged, and the query handler serving the search page."""
    from tailbridge.cli import demo as live

    settings = get_settings()
    signal.signal(signal.SIGINT, live.on_sigint)
    try:
        console.rule("1/7 stack")
        stack_up(as_json=False)
        console.rule("2/7 demo data")
        data_synth(items=items, users=users, seed=seed, out=None)
        console.rule("3/7 topics")
        topics_create()
        console.rule("4/7 features")
        features_apply()
        console.rule("5/7 live replay through the stream worker")
        dataset = _load_demo_data(_default_data_dir())
        reports = live.live_replay(settings, dataset, rate, events, seed, console)
        print_published(reports)
        live.print_topic_counts(settings, console)
        console.rule("6/7 ranker, trained on the feedback log the worker just wrote")
        live.train_demo_ranker(settings, _default_data_dir(), console)
        console.rule("query rewriter for long-tail queries, trained on the demo data (budgeted; reused)")
        _rewriting.demo_rewriter(settings, _default_data_dir())
        if loop:
            console.rule("alignment loop: one iteration on the replay's feedback log (`tailbridge loop --once`)")
            try:
                loop_cli.print_report(loop_cli.run_once(settings, _default_data_dir(), settings.data_dir / "offline"
                                                        / "feedback", loop_cli.KIND_ORDER, say=console.print,
                                                        force=True), console)
            except ValueError as exc:  # e.g. too little feedback logged to hold some out
                console.print(f"[yellow]alignment loop skipped: {exc}[/]")
        console.rule("7/7 query handler")
        live.serve(settings, dataset, console, keep_serving=serve)
    except KeyboardInterrupt:  # Ctrl-C: each step stops what it started (the worker included)
        console.print("\n[yellow]demo interrupted[/]: its stream worker, if started, is stopped; the stack "
                      "stays up (`tailbridge stack down` stops it).")
        raise typer.Exit(130) from None
    console.print("The stack is still running: `tailbridge stack status`, `tailbridge stack down`.")


# ------------------------------------------------------------------ rewriter (commands in cli/rewriting.py)

from tailbridge.cli import rewriting as _rewriting  # noqa: E402  (its commands join the apps above)

train_app.command("rewriter")(_rewriting.train_rewriter)
eval_app.command("rewriter")(_rewriting.eval_rewriter)
app.add_typer(_rewriting.rewriter_app, name="rewriter")


if __name__ == "__main__":
    app()
