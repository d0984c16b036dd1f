"""The rewriter's commands (registered in ``tailbridge.cli``):

    tailbridge train rewriter --data DIR [--feedback DIR] [--budget-minutes M] [--stage all|sft|align]
    tailbridge eval rewriter --data DIR --split test
    tailbridge rewriter fill --data DIR [--version V]      offline rewrites for tail queries -> store
    tailbridge rewriter worker                             rewrites for new rare queries on the stream
    tailbridge rewriter promote VERSION                    make a version's rewrites the live ones

and the rewrite routes of ``tailbridge eval retriever --rewrites VERSION`` (``rewrite_runs``).
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from tailbridge.settings import Settings, get_settings

console = Console()
rewriter_app = typer.Typer(help="Query rewrites for long-tail queries: the store and its worker.", no_args_is_help=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(1)


def models_root(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).data_dir / "models" / "rewriter"


def _threads(threads: int | None) -> None:
    import os

    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def default_feedback(data: Path) -> Path | None:
    """DATA/feedback when there is one, else the stream worker's log when there is one."""
    for candidate in (data / "feedback", get_settings().data_dir / "offline" / "feedback"):
        if (candidate / "examples").is_dir():
            return candidate
    return None


def build_search(data: Path):
    """Exact search over the data's catalog with the serving encoder (MiniLM on ONNX int8,
    as the stream indexer writes it) and BM25, fused as the handler fuses."""
    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.retrieval.encoders import MINILM_VERSION
    from tailbridge.models.retrieval.export import load_item_encoder
    from tailbridge.models.rewriting.search import ExactSearch

    dataset = load_dataset(data)
    with console.status(f"indexing {len(dataset.items)} items for exact search (MiniLM int8 + BM25)..."):
        return ExactSearch(dataset.items, load_item_encoder(MINILM_VERSION, get_settings().data_dir))


def _errors() -> tuple[type[Exception], ...]:
    from tailbridge.models.data.beir import BeirFormatError
    from tailbridge.models.data.feedback import FeedbackError
    from tailbridge.models.data.loaders import DatasetError
    from tailbridge.models.rewriting.generator import GeneratorError
    from tailbridge.models.rewriting.versions import VersionError

    return DatasetError, BeirFormatError, FeedbackError, GeneratorError, VersionError, ValueError, FileNotFoundError


def train_rewriter(
    data: Annotated[Path, typer.Option(help="Dataset dir: BEIR (and demo), ESCI parquet or WANDS.")],
    feedback: Annotated[Optional[Path], typer.Option(help="Feedback log (default: DATA/feedback, else the worker's).")] = None,
    budget_minutes: Annotated[float, typer.Option(min=0.2, help="Wall-time budget of both training stages.")] = 10.0,
    stage: Annotated[str, typer.Option(help="all (SFT, then feedback + alignment), sft or align.")] = "all",
    name: Annotated[Optional[str], typer.Option(help="Version name stem (default: <data>-<fingerprint>).")] = None,
    feedback_queries: Annotated[int, typer.Option(min=2, help="Stage-2 tail queries.")] = 320,
    candidates: Annotated[int, typer.Option(min=2, help="Beam candidates per stage-2 query.")] = 4,
    dev_queries: Annotated[int, typer.Option(min=1, help="Held-out tail queries every version is judged on.")] = 32,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: all cores).")] = None,
) -> None:
    """Train the query rewriter: multi-instruction SFT, offline feedback, objective alignment."""
    from tailbridge.models.rewriting.generator import load_base
    from tailbridge.models.rewriting.train import STAGES, RewriterConfig, train

    if stage not in ("all", *STAGES):
        _fail(f"unknown --stage {stage!r} (all, sft or align)")
    _threads(threads)
    root = models_root()
    feedback = feedback or default_feedback(data)
    try:
        search = build_search(data)
        cfg = RewriterConfig(budget_minutes=budget_minutes, feedback_queries=feedback_queries, candidates=candidates,
                             dev_queries=dev_queries)
        written = train(data, root, lambda: load_base(root), search, feedback, cfg, name,
                        STAGES if stage == "all" else (stage,), say=console.print)
    except _errors() as exc:
        _fail(str(exc))
    console.print(f"versions: {', '.join(written)} (under {root})")


def _quality_table(report: dict[str, Any]) -> Table:
    from tailbridge.models.rewriting.evaluate import QUALITY, RETRIEVAL

    table = Table(title=f"{report['data']} / {report['split']}: rewrites fused, exact search "
                        f"({', '.join(report['rewritten_strata'])} queries rewritten)")
    for column in ("system", "stratum", "queries", "rewritten", "served", *RETRIEVAL, *QUALITY):
        table.add_column(column, justify="right" if column not in ("system", "stratum") else "left", no_wrap=True)
    for system, body in report["systems"].items():
        for stratum, row in body["retrieval"].items():
            table.add_row(system if stratum == "overall" else "", stratum, str(row["queries"]), str(row["rewritten"]),
                          str(row["served"]),
                          *("-" if row[m] is None else f"{row[m]:.4f}" for m in (*RETRIEVAL, *QUALITY)))
    return table


def eval_rewriter(
    data: Annotated[Path, typer.Option(help="Dataset dir (as for training).")],
    split: Annotated[str, typer.Option(help="Judgements to evaluate on.")] = "test",
    aligned: Annotated[Optional[str], typer.Option(help="Aligned version (default: the newest).")] = None,
    sft: Annotated[Optional[str], typer.Option(help="SFT version (default: the aligned one's parent).")] = None,
    strata: Annotated[str, typer.Option(help="Strata the rewriter rewrites, comma separated, or all.")] = "tail",
    rewrites: Annotated[int, typer.Option(min=1, help="Rewrites per query (search fuses up to 3).")] = 2,
    beams: Annotated[int, typer.Option(min=1)] = 4,
    max_queries: Annotated[Optional[int], typer.Option(min=1, help="Budget: evaluate only the first N queries "
                                                                    "that get rewritten.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where rewriter-eval-<split>.json/.png go (default: the aligned version's dir).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Also write each system's fused top 100 as TREC runs.")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Generate with the int8 copies the worker and the fill use "
                                                      "(TAILBRIDGE_REWRITE_INT8), to judge the rewrites as served.")] = False,
    intent_rule: Annotated[bool, typer.Option(help="Keep only the rewrites the store would keep (the minimum-relevance "
                                                   "rule at TAILBRIDGE_REWRITE_MIN_INTENT); --no-intent-rule: all.")] = True,
) -> None:
    """No rewriting vs SFT-only vs aligned: nDCG@10 and Recall@100 with rewrites fused, and the
    rewrites' relevance, increment and hit rate, overall and per stratum."""
    import json

    from tailbridge.models.rewriting.evaluate import evaluate
    from tailbridge.models.rewriting.versions import load_version, resolve

    _threads(threads)
    root = models_root()
    try:
        top = resolve(root, aligned, None if aligned else "aligned")
        parent = sft or (top["parent"] if top["stage"] == "aligned" else None)
        systems = {f"sft ({parent})": parent} if parent else {}
        systems[f"{top['stage']} ({top['version']})"] = top["version"]
        search = build_search(data)
        report = evaluate(data, search, {label + (" int8" if int8 else ""): (lambda v=v: load_version(root, v, int8=int8))
                                         for label, v in systems.items()},
                          split, tuple(s.strip() for s in strata.split(",")), rewrites, beams,
                          out_dir=out or root / top["version"], run_dir=run_dir, max_queries=max_queries,
                          min_intent=get_settings().rewrite_min_intent if intent_rule else None, say=console.print)
    except _errors() as exc:
        _fail(str(exc))
    console.print(_quality_table(report))
    for system, body in report["systems"].items():
        if "examples" in body:
            console.print(f"{system}: {body['per_query_ms']} ms per query; {body['generated']} rewrites generated, "
                          f"{body['dropped_by_intent']} dropped by the intent rule; distinct first rewrites "
                          f"{body['distinct_share']}; e.g. " + json.dumps(dict(list(body['examples'].items())[:3])))
    console.print(f"wrote {(out or root / top['version']) / f'rewriter-eval-{split}.json'} and .png"
                  + (f"; TREC runs in {run_dir}" if run_dir else ""))


def rewrite_runs(data: Path, split: str, version: str, run_dir: Path) -> dict[str, Any]:
    """``eval retriever --rewrites VERSION``: TREC runs of the handler's fused search without
    and with the version's rewrite routes (tail queries rewritten, as served)."""
    from tailbridge.models.rewriting.evaluate import evaluate
    from tailbridge.models.rewriting.versions import load_version

    root = models_root()
    search = build_search(data)
    return evaluate(data, search, {f"rewrites-{version}": lambda: load_version(root, version)}, split,
                    out_dir=run_dir, run_dir=run_dir, min_intent=get_settings().rewrite_min_intent, say=console.print)


# ------------------------------------------------------------------ store: fill, promote, worker


def tail_queries(data: Path, feedback: Path | None, max_seen: int) -> list[str]:
    """The queries that get rewrites ahead of time: the data's tail stratum (every split) and the
    log's queries searched at most ``max_seen`` times, as query keys."""
    from tailbridge.models.data.feedback import read_feedback
    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.vocab import normalize_query

    dataset = load_dataset(data)
    keys = {normalize_query(dataset.queries[q]) for q, s in dataset.strata.items() if s == "tail" and q in dataset.queries}
    if feedback is not None:
        log = read_feedback(feedback)
        counts = log.drop_duplicates("query_id")["query"].map(normalize_query).value_counts()
        keys |= set(counts[counts <= max_seen].index)
    return sorted(k for k in keys if k)


def _writer(settings: Settings):
    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.streams.rewrite_store import RewriteWriter

    url = resolve_online_store(settings).redis_url
    if url is None:
        _fail("the rewrite store needs Redis (the online store is the SQLite fallback)")
    return RewriteWriter.from_url(url, settings.feast_project)


@rewriter_app.command("fill")
def fill(
    data: Annotated[Path, typer.Option(help="Dataset dir whose tail queries get rewrites.")],
    version: Annotated[Optional[str], typer.Option(help="Rewriter version (default: the newest).")] = None,
    feedback: Annotated[Optional[Path], typer.Option(help="Also the log's rare queries (default: as training).")] = None,
    max_queries: Annotated[Optional[int], typer.Option(min=1)] = None,
    promote: Annotated[bool, typer.Option(help="Make the version's rewrites the live ones afterwards.")] = True,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,
) -> None:
    """Generate rewrites offline for the tail queries and write them to the store under the version."""
    from tailbridge.models.rewriting.versions import load_version, resolve

    settings = get_settings()
    _threads(threads)
    try:
        record = resolve(models_root(settings), version)
        keys = tail_queries(data, feedback or default_feedback(data), settings.rewrite_rare_max_seen)[:max_queries]
        generator = load_version(models_root(settings), record["version"], int8=settings.rewrite_int8)
        search = build_search(data)
    except _errors() as exc:
        _fail(str(exc))
    writer = _writer(settings)
    stats = fill_store(generator, writer, record["version"], keys, settings, search)
    console.print(f"{record['version']}: {stats['queries']} tail queries, {stats['with_rewrites']} got rewrites in "
                  f"{stats['seconds']} s ({stats['per_query_ms']} ms per query); {stats['dropped_by_intent']} "
                  f"rewrites dropped by the intent rule")
    if promote:
        moved = writer.promote(record["version"])
        console.print(f"promoted {record['version']}: {moved['live']} live queries ({moved['removed']} stale removed)")


def fill_store(generator: Any, writer: Any, version: str, keys: list[str], settings: Settings, search: Any,
               chunk: int = 64) -> dict[str, Any]:
    """Generate, keep what passes the minimum-relevance rule (``intent.keep_on_intent`` on
    ``search``), write."""
    from tailbridge.cli.training import progress_bar
    from tailbridge.models.rewriting.intent import keep_on_intent

    started, written, dropped = time.perf_counter(), 0, 0
    with progress_bar(f"generating rewrites ({version})", len(keys)) as advance:
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            rewrites = generator.rewrite(part, n=settings.rewrite_count, beams=settings.rewrite_beams)
            rewrites, lost = keep_on_intent(search, part, rewrites, settings.rewrite_min_intent)
            dropped += lost
            written += writer.put_many(version, {k: r for k, r in zip(part, rewrites) if r})
            advance(len(part))
    seconds = time.perf_counter() - started
    return {"queries": len(keys), "with_rewrites": written, "dropped_by_intent": dropped, "seconds": round(seconds, 1),
            "per_query_ms": round(1000 * seconds / max(len(keys), 1), 1)}


@rewriter_app.command("promote")
def promote(version: Annotated[str, typer.Argument(help="The version whose rewrites search should use.")]) -> None:
    """Make a version's rewrites the live ones (search follows at once)."""
    moved = _writer(get_settings()).promote(version)
    console.print(f"promoted {version}: {moved['live']} live queries ({moved['removed']} stale removed)")


@rewriter_app.command("worker")
def worker(
    version: Annotated[Optional[str], typer.Option(help="Rewriter version (default: the serving one, else the newest).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of the generator.")] = 1,
    data: Annotated[Optional[Path], typer.Option(help="Dataset dir whose catalog the minimum-relevance rule searches.")] = None,
    unchecked: Annotated[bool, typer.Option("--unchecked", help="Without --data: write rewrites without the rule.")] = False,
) -> None:
    """Consume the queries topic in its own consumer group and write rewrites for new rare
    queries to the store, each batch within a deadline; search never waits for it."""
    # A trained rewriter answers content-free queries ('aaaa...') with confident, unrelated
    # products; the rule is what drops them, so going without it has to be asked for.
    if data is None and not unchecked:
        _fail("rewriter worker needs --data DIR: the catalog its minimum-relevance rule searches, so that a "
              "rewrite that drifts to another product is never written (--unchecked writes without the rule)")
    from tailbridge.models.rewriting.intent import keep_on_intent
    from tailbridge.models.rewriting.versions import load_version, resolve
    from tailbridge.streams.rewrite_worker import RewriteWorker

    settings = get_settings()
    _threads(threads)
    writer = _writer(settings)
    try:
        record = resolve(models_root(settings), version or writer.serving_version())
        generator = load_version(models_root(settings), record["version"], int8=settings.rewrite_int8)
        search = build_search(data) if data is not None else None
    except _errors() as exc:
        _fail(str(exc))
    keep = None if search is None else (lambda queries, rewrites: keep_on_intent(search, queries, rewrites,
                                                                                 settings.rewrite_min_intent))
    console.print(f"rewrite worker: version {record['version']}{' (int8)' if generator.int8 else ''}, beams "
                  f"{settings.rewrite_worker_beams}, group {RewriteWorker.group_id(settings)}, intent rule "
                  + (f"on ({data})" if search is not None else "OFF (--unchecked: rewrites are written unchecked)"))
    try:
        RewriteWorker(settings, generator, record["version"], writer, keep=keep).run(report=console.print)
    except KeyboardInterrupt:
        console.print("rewrite worker stopped")


# ------------------------------------------------------------------ make demo

DEMO_REWRITER_NAME = "demo"
DEMO_REWRITER_MINUTES = 4.0
DEMO_FILL_QUERIES = 24  # test tail queries rewritten ahead of time in the demo (the worker does the rest live)


def _demo_writer(settings: Settings, say: Callable[[str], None]):
    """The rewrite store's writer, or None (said) when there is no Redis: the demo goes on."""
    from tailbridge.feature_repo.online import resolve_online_store
    from tailbridge.streams.rewrite_store import RewriteWriter

    url = resolve_online_store(settings).redis_url
    if url is None:
        say("[yellow]the rewrite store needs Redis (the online store is the SQLite fallback): "
            "search serves without rewrites[/]")
        return None
    return RewriteWriter.from_url(url, settings.feast_project)


def demo_rewriter(settings: Settings, data_dir: Path, say: Callable[[str], None] = console.print) -> str | None:
    """Train a small rewriter on the demo data within ``DEMO_REWRITER_MINUTES`` (a finished
    version is reused), then fill the store for some test tail queries with it (int8, greedy:
    the serving-time settings) and promote it. Returns the version, or None (said) when there
    is none."""
    from tailbridge.models.data.loaders import load_dataset
    from tailbridge.models.rewriting.generator import load_base
    from tailbridge.models.rewriting.train import RewriterConfig, train
    from tailbridge.models.rewriting.versions import VersionError, load_version, resolve
    from tailbridge.vocab import normalize_query

    writer = _demo_writer(settings, say)
    if writer is None:
        return None
    root = models_root(settings)
    search = build_search(data_dir)
    try:
        record = resolve(root, f"{DEMO_REWRITER_NAME}-aligned")
        say(f"rewriter {record['version']!r} already trained: reusing it")
    except VersionError:
        try:
            cfg = RewriterConfig(budget_minutes=DEMO_REWRITER_MINUTES, feedback_queries=16, dev_queries=16)
            written = train(data_dir, root, lambda: load_base(root), search, default_feedback(data_dir), cfg,
                            DEMO_REWRITER_NAME, say=say)
            record = resolve(root, written[-1])
        except _errors() as exc:
            say(f"[yellow]no rewriter ({exc}); search serves without rewrites[/]")
            return None
    dataset = load_dataset(data_dir)
    test = dataset.split("test")
    keys = sorted({normalize_query(dataset.queries[q]) for q in test if dataset.strata.get(q) == "tail"})[:DEMO_FILL_QUERIES]
    generator = load_version(root, record["version"], int8=settings.rewrite_int8)
    stats = fill_store(generator, writer, record["version"], keys, settings.model_copy(update={"rewrite_beams": 1}),
                       search)
    writer.promote(record["version"])
    say(f"{record['version']}: rewrites for {stats['with_rewrites']} of {stats['queries']} test tail queries in "
        f"{stats['seconds']} s ({stats['dropped_by_intent']} dropped by the intent rule), promoted; "
        "`tailbridge rewriter worker` writes them for new rare queries live")
    return record["version"]


def _only_from_rewrites(hit: dict[str, Any]) -> bool:
    """Every route that retrieved the result is a rewrite's: the query's own routes did not
    have it among their candidates (``serve_candidates`` per route)."""
    routes = (hit.get("parts") or {}).get("routes") or []
    return bool(routes) and all(route.startswith("rewrite:") for route in routes)


def show_rewritten(client: Any, settings: Settings, console: Console, print_results: Callable) -> None:
    """A filled query whose served top 5 has results that only its rewrites retrieved (a
    rewrite that changed the results), printed with each such result's rewrite and routes; else
    the first whose top 5 has a result that ranked best on a rewrite's route."""
    writer = _demo_writer(settings, console.print)
    version = writer.serving_version() if writer is not None else None
    if version is None:
        return
    prefix = writer.key(version, "")
    fallback = None
    for raw in sorted(writer._redis.scan_iter(match=prefix + "*", count=1000)):
        request = {"query": raw.decode()[len(prefix):], "k": 5, "explain": True}
        body = client.post("/search", json=request).json()
        results = body.get("results", [])
        changed = [hit for hit in results if _only_from_rewrites(hit)]
        if changed:
            print_results(console, f"rewritten long-tail query (rewriter {body['model_versions']['rewrites']}, "
                                   f"rewrites: {'; '.join(body['rewrites'])})", request, body)
            for hit in changed:
                console.print(f"  [green]#{hit['position']} {hit['title']!r}[/] came only from the rewrite "
                              f"{hit['source'][len('rewrite:'):]!r} ({', '.join(hit['parts']['routes'])}): the query's "
                              f"own routes did not have it in their top {settings.serve_candidates}")
            console.print("  the search page shows each result's route (with explain, every route that found it)")
            return
        if fallback is None and any(hit["source"].startswith("rewrite:") for hit in results):
            fallback = (request, body)
    if fallback is None:
        console.print("[yellow]no filled query's top 5 has a result from its rewrites[/]")
        return
    request, body = fallback
    print_results(console, f"rewritten long-tail query (rewrites: {'; '.join(body['rewrites'])})", request, body)
    console.print("  results whose route says rewrite:<text> ranked best on that rewrite's route (the query's own "
                  "routes found them too); the page's explain shows every route")
