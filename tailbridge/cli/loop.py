"""``tailbridge loop [--once]``: the alignment loop. When enough new feedback has been logged it
trains a candidate of each model kind from the serving version, gates it against the serving
version on a held-out recent slice of the log, and promotes it or records why not.

Thresholds (``TAILBRIDGE_LOOP_*``): an iteration is due when ``loop_min_new_searches`` new
searches were logged since the last one, or ``loop_max_interval_seconds`` passed with any new
search. Each kind trains within its own time budget, in this process (the handler and the
worker run in theirs; the loop uses ``--threads`` CPU threads, one by default).

Behaviour refresh: every poll that re-aligns the retriever first refreshes the serving
retriever's behaviour vectors when ``behaviour_refresh_seconds`` passed and
``behaviour_refresh_min_engagements`` engagements were logged (``tailbridge/cli/behaviour.py``;
the version stays).

Crash safety, kill -9 at any instant:

* candidates are written under ``DATA_DIR/models/.staging/`` and renamed into
  ``DATA_DIR/models/<kind>/<version>`` only when complete, so nothing a server could load is
  ever half-written; a staging directory a killed run left is removed by the next one;
* the registry is replaced atomically (``models.registry``), and it is the switch for the
  ranker (the handler follows it), so the ranker serves the old or the new version, whole;
* the retriever's new collection is built beside the serving one and the alias moves when it
  is complete (``streams.indexer.reindex``); the registry records the move after it, and
  ``tailbridge models list`` / the next iteration reconcile the record with the alias if the
  kill fell between the two;
* the loop's own state (``DATA_DIR/models/loop.json``: when it last ran, on how many
  searches) is written last, atomically: a killed iteration simply runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tailbridge.models.gate import decide
from tailbridge.models.registry import Registry, RegistryError, entry_from_artifact, models_root
from tailbridge.settings import Settings

KIND_ORDER = ("ranker", "retriever", "rewriter")
STATE_FILE, STAGING_DIR = "loop.json", ".staging"
REPLAY_METRICS = ("purchase_ndcg@10", "cart_ndcg@10", "click_ndcg@10")
# The rewriter's gate: the held-out online pairs it orders right, and the judged dev tail queries.
REWRITER_METRICS = ("online_pair_accuracy", "relevance", "increment", "hit_rate")
Say = Callable[[str], None]


@dataclass
class LoopState:
    last_run: float | None = None  # unix time the last iteration finished
    searches: int = 0  # logged searches it saw
    deferred: list[str] = field(default_factory=list)  # kinds that did not fit in its budget: first next time
    kind_seconds: dict[str, float] = field(default_factory=dict)  # each kind's last step, gate included


def read_state(settings: Settings) -> LoopState:
    path = models_root(settings.data_dir) / STATE_FILE
    return LoopState(**json.loads(path.read_text())) if path.is_file() else LoopState()


def write_state(settings: Settings, state: LoopState) -> None:
    path = models_root(settings.data_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


def due(settings: Settings, state: LoopState, searches: int, now: float) -> tuple[bool, str]:
    """Whether an iteration should run, and why (pure: the thresholds on volume and time)."""
    new = searches - state.searches
    if new <= 0:
        return False, "no new searches logged"
    if new >= settings.loop_min_new_searches:
        return True, f"{new} new searches >= {settings.loop_min_new_searches}"
    if state.last_run is None:
        return True, f"{new} new searches, first iteration"
    waited = now - state.last_run
    if waited >= settings.loop_max_interval_seconds:
        return True, f"{new} new searches and {waited:.0f} s since the last iteration"
    return False, (f"{new} new searches < {settings.loop_min_new_searches} and {waited:.0f} s < "
                   f"{settings.loop_max_interval_seconds:.0f} s since the last iteration")


def schedule(kinds: tuple[str, ...], deferred: list[str]) -> list[str]:
    """The order an iteration runs ``kinds`` in: what the last one deferred first."""
    first = [k for k in deferred if k in kinds]
    return first + [k for k in kinds if k not in first]


def expected_seconds(settings: Settings, state: LoopState, kind: str) -> float:
    """How long ``kind``'s step will take: its last measured one, else 1.5x its training budget
    (its gate, and for a promoted retriever the reindex, come on top of the budget)."""
    if kind in state.kind_seconds:
        return state.kind_seconds[kind]
    minutes = {"ranker": settings.loop_ranker_minutes, "retriever": settings.loop_retriever_minutes,
               "rewriter": settings.loop_rewriter_minutes}[kind]
    return 1.5 * 60 * minutes


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S")


def _staged(settings: Settings, kind: str, version: str, build: Callable[[Path], Path]) -> Path:
    """Build an artifact under the staging dir and move it into place only when complete."""
    staging = models_root(settings.data_dir) / STAGING_DIR / kind
    staging.mkdir(parents=True, exist_ok=True)
    built = build(staging)
    final = models_root(settings.data_dir) / kind / version
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, final)  # one rename: the version appears complete or not at all
    return final


@dataclass
class KindReport:
    kind: str
    candidate: str | None = None
    parent: str | None = None
    minutes: float = 0.0
    gate: dict[str, Any] | None = None
    promoted: bool = False
    note: str = ""


def _gate(settings: Settings, candidate: dict, serving: dict | None, metrics: tuple[str, ...],
          evidence: dict) -> dict[str, Any]:
    """The gate's decision and every number it saw (recorded on the candidate's registry entry)."""
    result = decide(candidate, serving, settings.loop_gate_tolerance, metrics, settings.loop_gate_min_pages,
                    pages=candidate.get("pages_purchase"), evidence=evidence)
    return result.to_json() | {"candidate_all": candidate, "serving_all": serving}


def ranker_step(settings: Settings, data: Path, log: Path, cutoff, slice_, say: Say) -> KindReport:
    from tailbridge.models import alignment
    from tailbridge.models.ranking import model as rk

    registry = Registry(models_root(settings.data_dir))
    serving = registry.read().serving("ranker")
    version = f"rk-loop-{_stamp()}"
    report = KindReport("ranker", version, serving.version if serving else None)
    started = time.monotonic()
    holdout = settings.loop_holdout_fraction
    path = _staged(settings, "ranker", version, lambda root: alignment.retrain_ranker(
        data, log, root, version, Path(serving.path) if serving else None, settings.loop_ranker_minutes, say, holdout))
    report.minutes = (time.monotonic() - started) / 60
    registry.register(entry_from_artifact("ranker", path, parent=report.parent))
    rd, searches = slice_
    candidate = alignment.ranker_replay(rk.load_ranker(path), rd, searches)
    current = alignment.ranker_replay(rk.load_ranker(Path(serving.path)), rd, searches) if serving else None
    report.gate = _gate(settings, candidate, current, REPLAY_METRICS,
                        {"held_out_searches": len(searches), "after": cutoff[0].isoformat()})
    _decide(registry, "ranker", version, report)
    return report


def retriever_step(settings: Settings, data: Path, log: Path, cutoff, slice_, say: Say) -> KindReport:
    from tailbridge.models import alignment
    from tailbridge.models.data.feedback import read_feedback
    from tailbridge.models.retrieval.encoders import encoder_as_of, load_encoder

    registry = Registry(models_root(settings.data_dir))
    serving = registry.read().serving("retriever")
    report = KindReport("retriever", None, serving.version if serving else None)
    if serving is None or not (Path(serving.path) / "config.json").is_file():
        report.note = (f"serving retriever {serving.version if serving else 'none'} is not a trained retriever "
                       "artifact: nothing to fine-tune (`tailbridge train retriever`, then `tailbridge reindex`)")
        return report
    version = report.candidate = f"tb-loop-{_stamp()}"
    started = time.monotonic()
    staging_log = models_root(settings.data_dir) / STAGING_DIR / "logs" / version
    shutil.rmtree(staging_log, ignore_errors=True)
    train_log = alignment.training_log(log, cutoff, staging_log)
    path = _staged(settings, "retriever", version, lambda root: alignment.finetune_retriever(
        data, train_log, root, version, Path(serving.path), settings.loop_retriever_minutes, say))
    shutil.rmtree(staging_log, ignore_errors=True)
    report.minutes = (time.monotonic() - started) / 60
    registry.register(entry_from_artifact("retriever", path, parent=serving.version))
    rd, searches = slice_
    scores = {}
    for name, where in (("candidate", path), ("serving", Path(serving.path))):
        # Serving with the behaviour rows it had at the cutoff: its live overlay may hold the
        # held-out slice's own engagements (models.retrieval.behaviour).
        encoder = load_encoder(str(where)) if name == "candidate" else \
            encoder_as_of(where, read_feedback(log), cutoff[0])
        scores[name] = alignment.retriever_replay(encoder, rd, searches) | {
            "judged_ndcg@10": alignment.retriever_judged(encoder, data, settings.loop_gate_max_queries)}
    report.gate = _gate(settings, scores["candidate"], scores["serving"],
                        (*REPLAY_METRICS, "judged_ndcg@10"),
                        {"held_out_searches": len(searches), "after": cutoff[0].isoformat(),
                         "judged_queries": settings.loop_gate_max_queries})
    if report.gate["promote"]:
        from tailbridge.streams.indexer import reindex
        from tailbridge.streams.item_index import connect

        say(f"retriever {version}: indexing the catalog beside the serving collection")
        reindex(settings, version, connect(settings), load_encoder(str(path)), keep_old=True)  # the alias moves
    _decide(registry, "retriever", version, report)
    drop_stale_collections(settings, registry, version, say)
    return report


def drop_stale_collections(settings: Settings, registry: Registry, current: str, say: Say) -> None:
    """Drop the collections of retriever versions that will not serve again: beyond the latest
    ``loop_retriever_collections`` that served, rejected ones, and loop candidates a killed
    iteration left (``current`` is this iteration's). Others' versions (a manual reindex) stay."""
    from tailbridge.streams.indexer import drop_versions
    from tailbridge.streams.item_index import connect

    state = registry.read()
    kept = set(state.history["retriever"][-settings.loop_retriever_collections:])
    stale = {v for v, entry in state.versions["retriever"].items() if v not in kept and v != current and (
        entry.status in ("retired", "rejected") or (entry.status == "candidate" and "-loop-" in v))}
    try:
        dropped = drop_versions(settings, connect(settings), stale)
    except Exception as exc:  # noqa: BLE001  Milvus down: the next iteration drops them
        say(f"note: old retriever collections not dropped ({type(exc).__name__}: {exc})")
        return
    if dropped:
        say(f"dropped {len(dropped)} retriever collection(s) nothing serves again: {', '.join(dropped)}")


def rewriter_step(settings: Settings, data: Path, log: Path, cutoff, slice_, say: Say, search: Any = None) -> KindReport:
    """Stage 3 of the serving rewriter again, on the partial order shoppers' feedback gives each
    query's served rewrites (``models.rewriting.online``; per-(query, rewrite) statistics in
    Redis). Gated against the serving version on held-out online pairs and on the judged dev
    tail queries; when promoted, the store's live queries get the candidate's rewrites under
    its version, then the store switches (``promote``), then the registry records it (a kill
    between the two is reconciled by ``sync`` from the store's pointer). ``search``: the exact
    search stage 3 judges with (default: the handler's, ``cli.rewriting.build_search``)."""
    import dataclasses

    import redis

    from tailbridge.cli.models import _rewriter_entry, rewrite_writer
    from tailbridge.cli.rewriting import build_search, fill_store
    from tailbridge.models.rewriting import online
    from tailbridge.models.rewriting.train import RewriterConfig, align_version, dev_metrics, prepare
    from tailbridge.models.rewriting.versions import load_version, read_record
    from tailbridge.streams.rewrite_feedback import evidence_rule, read_all_stats

    registry = Registry(models_root(settings.data_dir))
    serving = registry.read().serving("rewriter")
    report = KindReport("rewriter", None, serving.version if serving else None)
    root = models_root(settings.data_dir) / "rewriter"
    parent = read_record(root, serving.version) if serving else None
    writer = rewrite_writer(settings)
    if parent is None or writer is None:
        report.note = ("no rewrite store (the online store has no Redis)" if writer is None else
                       f"serving rewriter {serving.version if serving else 'none'} is not a rewriter version under "
                       f"{root}: nothing to re-align (`tailbridge train rewriter`, `tailbridge rewriter fill`)")
        return report
    try:
        stats = read_all_stats(writer._redis, settings)
    except redis.RedisError as exc:  # the other kinds still run; this one says why it did not
        report.note = f"the rewrite store did not answer ({type(exc).__name__}): rewriter not re-aligned"
        return report
    groups = online.online_groups(stats, evidence_rule(settings))
    train_groups, held = online.split_groups(groups, settings.loop_holdout_fraction)
    if not train_groups:
        report.note = (f"no query's served rewrites are ordered by enough feedback yet ({len(groups)} ordered, "
                       f"{len(held)} of them held out; each rewrite needs {settings.rewrite_min_shown} items shown)")
        return report
    stem = serving.version.split("-loop-")[0].removesuffix("-aligned").removesuffix("-sft")
    version = report.candidate = f"{stem}-loop-{_stamp()}-aligned"
    known = {f.name for f in dataclasses.fields(RewriterConfig)}
    cfg = RewriterConfig(**{k: v for k, v in parent.get("settings", {}).items() if k in known and k != "mining"})
    search = search if search is not None else build_search(data)
    prep = prepare(data, log if (log / "examples").is_dir() else None, cfg, serving.version)
    info = {"source": "online feedback", "queries": len(groups), "groups": len(train_groups),
            "pairs": sum(len(g.pairs) for g in train_groups), "held_out_groups": len(held)}
    say(f"rewriter {version}: stage 3 on {info['groups']} queries' online partial orders ({info['pairs']} ordered "
        f"pairs) from {serving.version}")

    def build(staging: Path) -> Path:
        align_version(load_version(root, serving.version), train_groups, prep, root, serving.version, version, cfg,
                      search, settings.loop_rewriter_minutes * 60, info, say, out_root=staging)
        return staging / version

    started = time.monotonic()
    path = _staged(settings, "rewriter", version, build)
    report.minutes = (time.monotonic() - started) / 60
    registry.register(_rewriter_entry(path))
    scores = {}
    for name, where in (("candidate", version), ("serving", serving.version)):
        generator = load_version(root, where)
        scores[name] = dev_metrics(generator, prep, search, cfg.dev_beams) | {
            "online_pair_accuracy": online.pair_accuracy(generator, held)}
    report.gate = _gate(settings, scores["candidate"], scores["serving"], REWRITER_METRICS,
                        {"held_out_groups": len(held), "dev_queries": len(prep.dev_qids), **info})
    if report.gate["promote"]:
        keys = writer.keys(serving.version)
        say(f"rewriter {version}: rewrites for the {len(keys)} queries {serving.version} has, then the store switches")
        fill_store(load_version(root, version, int8=settings.rewrite_int8), writer, version, keys, settings, search)
        writer.promote(version)
    _decide(registry, "rewriter", version, report)
    return report


def _decide(registry: Registry, kind: str, version: str, report: KindReport) -> None:
    if report.gate["promote"]:
        registry.promote(kind, version, gate=report.gate)
        report.promoted = True
    else:
        registry.reject(kind, version, gate=report.gate)


STEPS = {"ranker": ranker_step, "retriever": retriever_step, "rewriter": rewriter_step}


def run_once(settings: Settings, data: Path, log: Path, kinds: tuple[str, ...], say: Say,
             force: bool = False) -> dict[str, Any]:
    """One iteration: returns {due, reason, reports}."""
    from tailbridge.cli.models import sync
    from tailbridge.models import alignment

    staging = models_root(settings.data_dir) / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # what a killed iteration left: never a version
    for note in sync(settings, milvus="retriever" in kinds):
        say(f"note: {note}")
    state = read_state(settings)
    cut_time, cut_search, searches = alignment.log_cutoff(log, settings.loop_holdout_fraction)
    is_due, reason = due(settings, state, searches, time.time())
    pending = tuple(k for k in state.deferred if k in kinds)
    catching_up = bool(pending) and not (is_due or force)
    if catching_up:  # due last time, they did not fit in its budget: only they run, the thresholds wait
        is_due, reason, kinds = True, f"deferred from the last iteration: {', '.join(pending)}", pending
    if not (is_due or force):
        return {"due": False, "reason": reason, "reports": []}
    cutoff = (cut_time, cut_search)
    say(f"iteration: {reason if is_due else 'forced'}; held out: searches after {cut_time.isoformat()}")
    slice_ = alignment.heldout_slice(data, log, cutoff, settings.loop_gate_max_pages, say)
    reports, deferred, seconds = [], [], dict(state.kind_seconds)
    budget, started, trained = settings.loop_iteration_minutes * 60, time.monotonic(), False
    for kind in schedule(kinds, state.deferred):
        expected, elapsed = expected_seconds(settings, state, kind), time.monotonic() - started
        if trained and elapsed + expected > budget:  # the first kind that trains always runs
            deferred.append(kind)
            reports.append(KindReport(kind, note=f"deferred to the next iteration, where it goes first (about "
                                                 f"{expected / 60:.1f} min expected, {max(0.0, budget - elapsed) / 60:.1f} "
                                                 f"of the iteration's {budget / 60:.0f} min left)"))
            continue
        began = time.monotonic()
        try:
            report = STEPS[kind](settings, data, log, cutoff, slice_, say)
        except RegistryError as exc:
            report = KindReport(kind, note=str(exc))
        reports.append(report)
        if report.gate is not None:  # it trained and was judged (a skipped kind says why in its note)
            seconds[kind], trained = time.monotonic() - began, True
    last_run, seen = (state.last_run, state.searches) if catching_up else (time.time(), searches)
    write_state(settings, LoopState(last_run, seen, deferred, seconds))
    return {"due": True, "reason": reason, "reports": reports}


# ------------------------------------------------------------------ the command


def print_report(result: dict[str, Any], console) -> None:
    from rich.table import Table

    if not result["due"]:
        console.print(f"loop: not due ({result['reason']})")
        return
    table = Table(title="the gate: candidate against serving on the held-out slice")
    for column in ("kind", "metric", "candidate", "serving", "delta"):
        table.add_column(column, justify="left" if column in ("kind", "metric") else "right", no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in result["reports"]:
        for k, metric in enumerate((r.gate or {}).get("candidate", {})):
            delta = r.gate["deltas"].get(metric)
            table.add_row(r.kind if k == 0 else "", metric, fmt(r.gate["candidate"][metric]),
                          fmt((r.gate["serving"] or {}).get(metric)), "-" if delta is None else f"{delta:+.4f}")
    console.print(table)
    for r in result["reports"]:
        if r.gate is None:
            console.print(f"{r.kind}: [yellow]skipped[/]: {r.note}")
            continue
        evidence = r.gate["evidence"]
        slice_text = (f"{evidence.get('held_out_groups')} held-out queries' online pairs, {evidence.get('dev_queries')} "
                      "judged dev tail queries" if r.kind == "rewriter" else
                      f"{evidence.get('held_out_searches')} held-out searches, "
                      f"{r.gate['candidate_all'].get('pages_purchase')} with a purchase")
        console.print(f"{r.kind}: trained {r.candidate} from {r.parent or 'nothing'} in {r.minutes:.1f} min; "
                      + ("[bold green]promoted[/]" if r.promoted else "[red]rejected[/]")
                      + f" ({r.gate['reason']}; {slice_text}; tolerance {r.gate['tolerance']})")


def loop_command(
    once: Annotated[bool, typer.Option("--once", help="Run one iteration (if due) and exit.")] = False,
    data: Annotated[Optional[Path], typer.Option(help="Catalog and judgements (default DATA_DIR/demo).")] = None,
    feedback: Annotated[Optional[Path], typer.Option(help="Feedback log (default: the stream worker's).")] = None,
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds to re-align.")] = ",".join(KIND_ORDER),
    force: Annotated[bool, typer.Option(help="Run an iteration even when the thresholds are not met.")] = False,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for training (serving keeps the rest).")] = 1,
) -> None:
    """The alignment loop: retrain, gate and promote models from the live feedback log."""
    import torch
    from rich.console import Console

    from tailbridge.cli.behaviour import refresh_behaviour
    from tailbridge.settings import get_settings

    console = Console()
    settings = get_settings()
    torch.set_num_threads(threads)
    os.nice(settings.loop_nice)
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in chosen if k not in STEPS]
    if unknown:
        console.print(f"[bold red]error:[/] unknown kinds {unknown} (loop re-aligns {', '.join(STEPS)})")
        raise typer.Exit(1)
    data = data or settings.data_dir / "demo"
    log = feedback or settings.data_dir / "offline" / "feedback"
    if not (log / "examples").is_dir():
        console.print(f"[bold red]error:[/] no feedback log at {log} (run `tailbridge worker`, or pass --feedback)")
        raise typer.Exit(1)
    while True:
        started = time.monotonic()
        if "retriever" in chosen:  # between fine-tunings, behaviour vectors follow the log (cli/behaviour.py)
            try:
                console.print(refresh_behaviour(settings, log, say=console.print, thresholds=not force).line())
            except Exception as exc:  # noqa: BLE001  a failed refresh is retried at the next poll; the iteration runs
                console.print(f"[yellow]behaviour refresh failed:[/] {type(exc).__name__}: {exc}", soft_wrap=True)
        try:
            result = run_once(settings, data, log, chosen, say=console.print, force=force)
        except ValueError as exc:  # the data or the log cannot be used (named in the message)
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
        print_report(result, console)
        if result["due"]:
            console.print(f"iteration took {(time.monotonic() - started) / 60:.1f} min")
        if once:
            return
        force = False
        time.sleep(settings.loop_poll_seconds)
